#!/bin/sh
# A certbot deploy hook for the HAProxy export (--export haproxy) of a balancer whose --tls-cert
# and --tls-key are certbot's live/NAME/fullchain.pem and privkey.pem. HAProxy reads a
# certificate's key from the same PEM file, so after each renewal this writes the two as
# /etc/haproxy/certs/NAME.pem (the file the export names; outside certbot's folder, which certbot
# owns) and reloads HAProxy. Install it once, and run it once for the certificate there is:
#
#   sudo install -d -m 700 /etc/haproxy/certs
#   sudo install -m 755 examples/certbot-deploy-haproxy.sh /etc/letsencrypt/renewal-hooks/deploy/haproxy.sh
#   sudo RENEWED_LINEAGE=/etc/letsencrypt/live/shop.example.com \
#       /etc/letsencrypt/renewal-hooks/deploy/haproxy.sh
#
# certbot runs every script in renewal-hooks/deploy/ after each successful renewal, with
# RENEWED_LINEAGE set to the renewed live/NAME folder (`certbot renew --deploy-hook PATH` runs one
# for that run only). HAPROXY_CERTS and HAPROXY_RELOAD change where it writes and how it reloads.
set -eu
certs=${HAPROXY_CERTS:-/etc/haproxy/certs}
name=$(basename "$RENEWED_LINEAGE")
umask 077
cat "$RENEWED_LINEAGE/fullchain.pem" "$RENEWED_LINEAGE/privkey.pem" > "$certs/$name.pem.new"
mv "$certs/$name.pem.new" "$certs/$name.pem"  # a rename: HAProxy never reads half a file
${HAPROXY_RELOAD:-systemctl reload haproxy}
