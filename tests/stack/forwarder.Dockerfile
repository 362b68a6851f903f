# The stack test's way in (tests/stack/conftest.py): HAProxy from Debian's packages, on the stack's
# overlay network, in front of the proxy and the web page. Swarm's routing mesh needs IPVS, which
# the test machines' kernel lacks, so the ports docker-compose.yml publishes do not answer there.
# HAProxy resolves tasks.proxy and tasks.web through Docker's DNS (127.0.0.11), sends new TCP
# connections only to proxy tasks whose /ready (admin port 9901) answers 200, and forwards bytes
# unchanged (TCP mode): HTTP/1.1 and h2c reach the proxy as the client sent them. Test-only.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN export DEBIAN_FRONTEND=noninteractive \
 && apt-get -q update \
 && apt-get -q install -y --no-install-recommends haproxy \
 && rm -rf /var/lib/apt/lists/*
COPY haproxy.cfg /etc/haproxy/haproxy.cfg
EXPOSE 8080 8000
STOPSIGNAL SIGUSR1
CMD ["haproxy", "-W", "-db", "-f", "/etc/haproxy/haproxy.cfg"]
