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
from agent.errors import ConfigError, PySpyMissing
from agent.incidents import IncidentStore
from agent.metrics import AgentCollector
from agent.monitor import IncidentListener, Monitor, log_incident
from agent.procfs import Scanner
from agent.push import Pusher
from agent.pyspy import PySpy
from agent.remediation import Mode as RemediationMode
from agent.remediation import Remediator
from agent.sampler import Mode, Sampler
from agent.server import AgentApp, HttpServer
from agent.signatures import load_catalog
from agent.slack import LogNotifier, SlackNotifier
from agent.webconfig import WebConfigFile

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
    pusher: Pusher | None = None  # with --push-gateway or --l2met; started by start_pushing()

    @classmethod
    def create(
        cls,
        config: AgentConfig,
        *,
        host: str,
        listeners: Sequence[IncidentListener] = (log_incident,),
    ) -> Agent:
        """Check py-spy, load signatures, open the store, bind the port; raises AgentError."""
        web = None
        if config.web_config_file is not None:
            web = WebConfigFile(config.web_config_file)  # first: a bad file is one line
        stop = threading.Event()
        sampler, py_spy_version = build_sampler(config, stop)
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
        remediation = config.remediation()
        remediator = None
        if remediation.mode is not RemediationMode.OFF:
            remediator = Remediator(remediation)
            log.warning(
                "remediation %s: deadlocked workers get SIGABRT after %gs, SIGKILL %gs later "
                "if still alive; at most %d per worker slot and %d on this host per %gs",
                remediation.mode, remediation.grace, remediation.abort_wait,
                remediation.max_per_slot, remediation.max_per_host, remediation.window,
            )  # fmt: skip
        monitor = Monitor(
            workers=Discovery(master_pid=config.master_pid, pidfile=config.pidfile),
            sampler=sampler,
            tracker=Tracker(load_catalog(), config.analysis()),
            interval=config.interval,
            listeners=(*listeners, notifier),
            incidents=IncidentBook(stuck_incident_after=config.stuck_incident_after),
            store=store,
            remediator=remediator,
            remediation_listeners=(notifier.remediated,),
        )
        registry = CollectorRegistry()
        pusher = None
        if config.push_gateway or config.l2met:
            pusher = Pusher(
                registry, instance=host, gateway=config.push_gateway,
                interval=config.push_interval, timeout=config.push_timeout, l2met=config.l2met,
            )  # fmt: skip
        registry.register(
            AgentCollector(
                lambda: monitor.last_report,
                version=__version__,
                py_spy_version=py_spy_version,
                worker_labels=config.worker_labels,
                notifications=notifier.stats.snapshot,
                pushes=pusher.stats.snapshot if pusher and config.push_gateway else None,
            )
        )
        app = AgentApp(
            registry, lambda: monitor.last_report, stale_after=config.stale_after, store=store
        )
        server = HttpServer(app, config.listen_address, web=web)
        if web is not None:
            log.info("--web.config.file %s: %s", web.path, web.describe())
        return cls(config, monitor, registry, server, notifier, store, stop, pusher)

    def start_pushing(self) -> None:
        """Start pushing (and l2met lines), when configured: the caller starts the server."""
        if self.pusher is not None:
            self.pusher.start()

    def close(self) -> None:
        """Stop serving, delete the pushed group and flush queued notifications (bounded:
        about 2 x push timeout + 5 s, well inside the 30 s between SIGTERM and SIGKILL)."""
        self.server.close()
        if self.pusher is not None:
            self.pusher.close()
        self.notifier.close(timeout=5.0)
        if self.monitor.sampler is not None:
            self.monitor.sampler.close()


def build_sampler(config: AgentConfig, stop: threading.Event) -> tuple[Sampler, str]:
    """py-spy (checked) and/or the probe client, as --sampler says; and py-spy's version
    ("none" when auto runs on the probe alone because py-spy is missing)."""
    mode = Mode(config.sampler)
    probe = None
    if config.probe_dir is not None:
        from agent.probe.client import ProbeClient

        probe = ProbeClient(config.probe_dir)
    pyspy: PySpy | None = None
    version = "none"
    if mode is not Mode.PROBE:
        pyspy = PySpy(config.py_spy, timeout=config.py_spy_timeout, stop=stop)
        try:
            version = pyspy.check()
        except PySpyMissing as err:
            if mode is Mode.PYSPY or probe is None:
                raise
            log.warning("%s; sampling with the in-process probe only", err)
            pyspy = None
        else:
            log.info("using py-spy %s at %s", version, pyspy.executable)
    if probe is not None:
        log.info("in-process probes answer in %s (--sampler=%s)", config.probe_dir, mode)
    return Sampler(mode, pyspy=pyspy, probe=probe, scanner=Scanner()), version
