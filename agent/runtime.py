"""Wires the pieces into a running agent: used by `watch` and by the demo alike."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from agent import __version__
from agent.analysis import IncidentBook, Tracker
from agent.config import AgentConfig
from agent.discovery import Discovery
from agent.errors import ConfigError
from agent.incidents import IncidentStore
from agent.metrics import AgentCollector
from agent.monitor import IncidentListener, Monitor, log_incident
from agent.pyspy import PySpy
from agent.server import AgentApp, HttpServer
from agent.signatures import load_catalog
from agent.slack import LogNotifier, SlackNotifier

log = logging.getLogger(__name__)


@dataclass
class Agent:
    """A monitor, its notifier, incident store, metrics registry and HTTP server."""

    config: AgentConfig
    monitor: Monitor
    registry: CollectorRegistry
    server: HttpServer
    notifier: SlackNotifier | LogNotifier
    store: IncidentStore
    stop: threading.Event

    @classmethod
    def create(
        cls,
        config: AgentConfig,
        *,
        host: str,
        listeners: Sequence[IncidentListener] = (log_incident,),
    ) -> Agent:
        """Check py-spy, load signatures, open the store, bind the port; raises AgentError."""
        stop = threading.Event()
        pyspy = PySpy(config.py_spy, timeout=config.py_spy_timeout, stop=stop)
        py_spy_version = pyspy.check()
        try:
            store = IncidentStore(
                config.incidents_dir,
                max_count=config.incidents_max_count,
                max_bytes=config.incidents_max_bytes,
            )
        except OSError as err:
            raise ConfigError(
                f"--incidents.dir / DEADLOCK_AGENT_INCIDENTS_DIR: cannot use "
                f"{config.incidents_dir}: {err.strerror}"
            ) from err
        notifier: SlackNotifier | LogNotifier
        if config.slack_webhook_url:
            notifier = SlackNotifier(
                config.slack_webhook_url, host=host, public_url=config.external_url
            )
        else:
            notifier = LogNotifier(host=host, public_url=config.external_url)
        monitor = Monitor(
            workers=Discovery(master_pid=config.master_pid, pidfile=config.pidfile),
            stacks=pyspy,
            tracker=Tracker(load_catalog(), config.analysis()),
            interval=config.interval,
            listeners=(*listeners, notifier),
            incidents=IncidentBook(stuck_incident_after=config.stuck_incident_after),
            store=store,
        )
        registry = CollectorRegistry()
        registry.register(
            AgentCollector(
                lambda: monitor.last_report,
                version=__version__,
                py_spy_version=py_spy_version,
                worker_labels=config.worker_labels,
                notifications=notifier.stats.snapshot,
            )
        )
        app = AgentApp(
            registry, lambda: monitor.last_report, stale_after=config.stale_after, store=store
        )
        server = HttpServer(app, config.listen_address)
        log.info("using py-spy %s at %s", py_spy_version, pyspy.executable)
        return cls(config, monitor, registry, server, notifier, store, stop)

    def close(self) -> None:
        """Stop serving and flush queued notifications (bounded)."""
        self.server.close()
        self.notifier.close(timeout=5.0)
