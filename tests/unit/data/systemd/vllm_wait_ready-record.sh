#!/bin/sh
# Records the vllm_wait_ready-* files (see README.md). Run as root inside a throwaway
# test-host container (systemd 252); the files land in /rec, copy them out with `docker cp`.
# vllm.service is a stand-in with the role's unit settings that matter here
# (Type=exec, Restart=always, RestartSec=10, StartLimitIntervalSec=600, StartLimitBurst=5).
set -e
cat > /etc/systemd/system/vllm.service <<'U'
[Unit]
Description=stand-in for vllm.service (recording)
Wants=vllm-proxy.socket
StartLimitIntervalSec=600
StartLimitBurst=5
[Service]
Type=exec
ExecStart=/bin/sleep infinity
Restart=always
RestartSec=10
U
cat > /etc/systemd/system/vllm-proxy.socket <<'U'
[Unit]
PartOf=vllm.service
DefaultDependencies=no
Requires=sysinit.target
After=sysinit.target vllm.service
Before=shutdown.target
Conflicts=shutdown.target
[Socket]
ListenStream=127.0.0.1:8000
FreeBind=yes
U
cat > /etc/systemd/system/vllm-proxy.service <<'U'
[Service]
ExecStart=/lib/systemd/systemd-socket-proxyd 127.0.0.1:8001
U
systemctl daemon-reload
systemctl restart vllm
mkdir -p /rec && cd /rec
P=LoadState,ActiveState,SubState,NRestarts,ActiveEnterTimestampMonotonic,Result
sleep 3
systemctl show vllm -p $P > vllm_wait_ready-loading.show.txt
python3 -c "import time; print(time.clock_gettime(time.CLOCK_MONOTONIC))" > vllm_wait_ready-loading.monotonic.txt
systemctl show vllm-proxy.socket -p $P > vllm_wait_ready-socket-listening.show.txt
systemctl show nosuch-proxy.socket -p $P > vllm_wait_ready-socket-not-found.show.txt
# The engine dies.
systemctl kill -s KILL vllm
sleep 2
systemctl show vllm -p $P > vllm_wait_ready-auto-restart.show.txt
sleep 10
systemctl show vllm -p $P > vllm_wait_ready-restarted.show.txt
journalctl -u vllm -n 25 --no-pager -o cat > vllm_wait_ready-restarted.journal.txt
systemctl stop vllm
systemctl show vllm -p $P > vllm_wait_ready-stopped.show.txt

# Another process holds the API port when the socket starts.
systemctl stop vllm-proxy.socket
python3 -c "
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', 8000)); s.listen(); time.sleep(30)" &
sleep 1
systemctl start vllm-proxy.socket || true
systemctl show vllm-proxy.socket -p $P > vllm_wait_ready-socket-port-taken.show.txt
journalctl -u vllm-proxy.socket -n 25 --no-pager -o cat > vllm_wait_ready-socket-port-taken.journal.txt

# A service that dies at once, until the start limit (about 50 s).
mkdir -p /etc/systemd/system/vllm.service.d
printf '[Service]\nExecStart=\nExecStart=/bin/sh -c "echo engine died >&2; exit 1"\n' \
  > /etc/systemd/system/vllm.service.d/crash.conf
systemctl daemon-reload
systemctl reset-failed vllm
systemctl start vllm
for i in $(seq 1 70); do
  [ "$(systemctl show vllm -p ActiveState --value)" = failed ] && break
  sleep 1
done
systemctl show vllm -p $P > vllm_wait_ready-start-limit-hit.show.txt
journalctl -u vllm -n 25 --no-pager -o cat > vllm_wait_ready-start-limit-hit.journal.txt
