# deadlock-agent as a sidecar container. It must see the app's processes and be allowed to
# ptrace them: run it in the app's pid namespace with CAP_SYS_PTRACE, e.g.
#   docker run --pid=container:web --cap-add SYS_PTRACE -p 19808:19808 deadlock-agent
# (Kubernetes: shareProcessNamespace: true and securityContext.capabilities.add: [SYS_PTRACE]).
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
RUN pip install --no-cache-dir . && rm -rf /src
WORKDIR /
EXPOSE 19808
ENTRYPOINT ["deadlock-agent"]
# Inside a container the agent serves every interface so Prometheus can reach it.
CMD ["watch", "--web.listen-address", "0.0.0.0:19808"]
