#!/bin/sh
# Install mbworker from the system node's wheelhouse; the system node may come up after this one (and fills its
# wheelhouse only once it runs), so retry (for at most 30 minutes) until it serves. Plain HTTP on the private
# network ("trusted host"): every wheel is checked against the sha256 pinned in requirements.txt, so the transport
# needs no trust.
set -u
deadline=$(( $(date +%s) + 1800 ))
until /opt/mbworker/bin/pip install --quiet --disable-pip-version-check --no-index --require-hashes \
    --find-links {{ wheel_url }} --trusted-host {{ wheel_host }} -r /etc/mbworker/requirements.txt; do
  if [ "$(date +%s)" -ge "$deadline" ]; then echo "wheelhouse {{ wheel_url }} not usable" >&2; exit 1; fi
  sleep 5
done
