#!/bin/sh
# compose.yaml's nginx: deploy/nginx.conf as it is, with the compose stack's instances as its upstream servers
# (OAUTHPROXY_UPSTREAMS: host:port, space-separated), then nginx in the foreground.
# NGINX_LISTEN_ADDRESS (e.g. 127.0.0.1) and HTTPS_PORT / HTTP_PORT (443 / 80) move the listeners, for hosts where
# the stack shares the host's network (the tests); the [::] listeners are then dropped.
set -eu
address=${NGINX_LISTEN_ADDRESS:-}
https_port=${HTTPS_PORT:-443}
http_port=${HTTP_PORT:-80}
prefix=${address:+$address:}
awk -v upstreams="${OAUTHPROXY_UPSTREAMS:?name the instances: host:port ...}" -v prefix="$prefix" \
    -v https="$https_port" -v http="$http_port" -v only_v4="${address:+1}" '
  /^[ \t]*server 127\.0\.0\.1:8080;/ {
    count = split(upstreams, servers, " ")
    for (i = 1; i <= count; i++) print "    server " servers[i] ";"
    next
  }
  /^[ \t]*listen \[::\]:/ { if (only_v4) next }
  { sub(/listen 443 ssl/, "listen " prefix https " ssl"); sub(/listen 80;/, "listen " prefix http ";"); print }
' /etc/oauthproxy/nginx.conf > /etc/nginx/conf.d/default.conf
# Debian's packaged nginx also enables a default site on port 80; the official image has none.
rm -f /etc/nginx/sites-enabled/default
nginx -t -q
exec nginx -g 'daemon off;'
