#!/usr/bin/env bash
# Install the system packages the tests need when they are missing: Mosquitto (every broker test starts
# its own), Debian's Chromium and its driver (the dashboard's browser tests drive it through playwright,
# no browser download), espeak-ng (the speech example's voices). Called by `make test` (target `deps`) and by .ci/run; quick when all are there.
# Without root it uses sudo when it can, else it names what to install and leaves the tests to say so.
set -euo pipefail

need=()
command -v mosquitto >/dev/null || need+=(mosquitto mosquitto-clients)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
# The interop suite starts aedes, an MQTT broker from npm (tests/interop_support.py).
command -v npm >/dev/null || need+=(nodejs npm)
# The speech example and its test synthesise spoken command words (examples/speech_commands.py).
command -v espeak-ng >/dev/null || need+=(espeak-ng)
# The clustered-broker test starts a 3-node NATS cluster with MQTT listeners (tests/test_nats_cluster.py).
command -v nats-server >/dev/null || need+=(nats-server)
if ((${#need[@]} == 0)); then
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "ensure-system-deps: missing ${need[*]}; install them with: sudo apt-get install -y ${need[*]}" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "ensure-system-deps: missing ${need[*]} and no apt-get here; install them with your package manager" >&2
  exit 0
fi
echo "ensure-system-deps: installing ${need[*]}"
"${as_root[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq "${need[@]}"
