# A stand-in for nginx:alpine (the Dockerfile's WEB_IMAGE) on a machine without Docker Hub: nginx
# and wget from Debian's packages, laid out as the nginx image is, so the `web` target's
# /etc/nginx/conf.d/default.conf, /usr/share/nginx/html and `wget` health check work unchanged.
# Test-only: built by tests/stack from the debootstrap base image.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN export DEBIAN_FRONTEND=noninteractive \
 && apt-get -q update \
 && apt-get -q install -y --no-install-recommends nginx-light wget \
 && rm -rf /var/lib/apt/lists/* \
 && rm -f /etc/nginx/sites-enabled/default \
 && mkdir -p /usr/share/nginx/html \
 && ln -sf /dev/stdout /var/log/nginx/access.log \
 && ln -sf /dev/stderr /var/log/nginx/error.log
EXPOSE 80
# As the nginx image: a graceful stop, in the foreground.
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
