#!/bin/sh
# Install Mosquitto and its command-line clients from Debian's packages, as root.
# The package's init script would start a system-wide Mosquitto on port 1883 (the port
# `meshchat up` uses), so service starts are held back during the install.
set -eu
policy=/usr/sbin/policy-rc.d
created=0
if [ ! -e "$policy" ]; then
	printf '#!/bin/sh\nexit 101\n' >"$policy"
	chmod 755 "$policy"
	created=1
fi
trap '[ "$created" = 1 ] && rm -f "$policy"' EXIT
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	mosquitto mosquitto-clients
