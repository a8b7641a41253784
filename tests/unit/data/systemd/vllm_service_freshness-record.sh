#!/bin/bash
# Run inside a throwaway test-host container (see README.md); writes the recordings to /root/rec.
set -eu
out=/root/rec; mkdir -p $out /etc/vllm
cat > /etc/systemd/system/vllm.service <<'U'
[Unit]
Description=stand-in for the vLLM service (records systemctl show)
[Service]
ExecStart=/bin/sleep infinity
U
echo 'X=1' > /etc/vllm/vllm.env
systemctl daemon-reload
clock() { python3 -c 'import time,json;print(json.dumps({"time":time.time(),"monotonic":time.clock_gettime(time.CLOCK_MONOTONIC)}))'; }
show() { systemctl show "$1" -p MainPID,ExecMainStartTimestampMonotonic; }
systemctl start vllm; sleep 2
show vllm > $out/vllm_service_freshness-running.show.txt; clock > $out/vllm_service_freshness-running.clock.json
systemctl show vllm -p ExecMainStartTimestamp --timestamp=us+utc > $out/vllm_service_freshness-running.wallclock.txt
sleep 2; echo 'X=2' > /etc/vllm/vllm.env; stat -c '%.9Y' /etc/vllm/vllm.env > $out/vllm_service_freshness-env-changed.mtime.txt
sleep 1
show vllm > $out/vllm_service_freshness-env-changed.show.txt; clock > $out/vllm_service_freshness-env-changed.clock.json
systemctl restart vllm; sleep 2
show vllm > $out/vllm_service_freshness-restarted.show.txt; clock > $out/vllm_service_freshness-restarted.clock.json
systemctl show vllm -p ExecMainStartTimestamp --timestamp=us+utc > $out/vllm_service_freshness-restarted.wallclock.txt
systemctl stop vllm
show vllm > $out/vllm_service_freshness-stopped.show.txt
show no-such-service > $out/vllm_service_freshness-not-found.show.txt
systemctl --version | head -1 > $out/vllm_service_freshness-version.txt
date -u +%Y-%m-%d >> $out/vllm_service_freshness-version.txt
