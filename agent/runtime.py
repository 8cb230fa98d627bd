"""Wires the pieces into a running agent: used by `watch` and by the demo alike."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from agent import __version__
from agent.analysis import Tracker
from agent.config import AgentConfig
from agent.discovery import Discovery
from agent.metrics import AgentCollector
from agent.monitor import IncidentListener, Monitor, log_incident
from agent.pyspy import PySpy
from agent.server import AgentApp, HttpServer
from agent.signatures import load_catalog

log = logging.getLogger(__name__)


@dataclass
class Agent:
    """A monitor, its metrics registry and its HTTP server."""

    config: AgentConfig
    monitor: Monitor
    registry: CollectorRegistry
    server: HttpServer
    stop: threading.Event

    @classmethod
    def create(
        cls,
        config: AgentConfig,
        *,
        listeners: Sequence[IncidentListener] = (log_incident,),
    ) -> Agent:
        """Check py-spy, load signatures, bind the port; raises AgentError with the fix."""
        stop = threading.Event()
        pyspy = PySpy(config.py_spy, timeout=config.py_spy_timeout, stop=stop)
        py_spy_version = pyspy.check()
        monitor = Monitor(
            workers=Discovery(master_pid=config.master_pid, pidfile=config.pidfile),
            stacks=pyspy,
            tracker=Tracker(load_catalog(), config.analysis()),
            interval=config.interval,
            listeners=listeners,
        )
        registry = CollectorRegistry()
        registry.register(
            AgentCollector(
                lambda: monitor.last_report,
                version=__version__,
                py_spy_version=py_spy_version,
                worker_labels=config.worker_labels,
            )
        )
        app = AgentApp(registry, lambda: monitor.last_report, stale_after=config.stale_after)
        server = HttpServer(app, config.listen_address)
        return cls(config, monitor, registry, server, stop)
