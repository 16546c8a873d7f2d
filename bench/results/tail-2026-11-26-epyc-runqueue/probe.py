#!/usr/bin/env python3
"""Every 0.1 s: per process group, CPU run time and runqueue wait (schedstat,
summed over threads), plus the node's deliveries in the window and how many
were slower than 25 / 50 ms (stream clock). Usage: probe.py seconds out"""
import os, sys, time, re, urllib.request
dur, out = float(sys.argv[1]), sys.argv[2]
def procs():
    g = {}
    for p in os.listdir('/proc'):
        if not p.isdigit(): continue
        try:
            cmd = open(f'/proc/{p}/cmdline','rb').read().split(b'\0')
        except Exception: continue
        exe = os.path.basename(cmd[0].decode(errors='replace'))
        args = [c.decode(errors='replace') for c in cmd]
        if exe == 'nats-server': k = 'nats'
        elif exe == 'agentcast': k = 'node'
        elif exe.startswith('load-') and '--role' in args:
            k = args[args.index('--role')+1]
        elif exe.startswith('load-'): k = 'bench'
        else: continue
        g.setdefault(k, []).append(p)
    return g
def node_port(pids):
    for p in pids:
        for line in open('/proc/net/tcp').read().splitlines()[1:]:
            pass
    return None
def stat(pids):
    run = wait = 0
    for p in pids:
        try:
            for t in os.listdir(f'/proc/{p}/task'):
                try:
                    a = open(f'/proc/{p}/task/{t}/schedstat').read().split()
                    run += int(a[0]); wait += int(a[1])
                except Exception: pass
        except Exception: pass
    return run, wait
LE = re.compile(r'le="([^"]+)"\} (\d+)')
def lat(url):
    try:
        txt = urllib.request.urlopen(url, timeout=0.5).read().decode()
    except Exception: return None
    b = {}
    for line in txt.splitlines():
        if line.startswith('agentcast_delivery_latency_seconds_bucket') and 'clock="stream"' in line:
            m = LE.search(line)
            if m: b[m.group(1)] = int(m.group(2))
    if not b: return None
    tot = b.get('+Inf', 0)
    def over(x):
        cands = [k for k in b if k != '+Inf' and float(k) <= x]
        k = max(cands, key=float)
        return tot - b[k]
    return tot, over(0.025), over(0.05)
url = None
import subprocess
t0 = time.time(); prev = None; rows = []
f = open(out, 'w')
while time.time() - t0 < dur:
    g = procs()
    if url is None and 'node' in g:
        s = subprocess.run(['ss','-ltnpH'], capture_output=True, text=True).stdout
        for line in s.splitlines():
            if f'pid={g["node"][0]},' in line:
                url = f'http://{line.split()[3]}/metrics'; break
    now = time.time()
    cur = {k: stat(v) for k, v in g.items()}
    a = [int(x) for x in open('/proc/stat').readline().split()[1:]]
    cur['~cpu'] = (sum(a) - a[3] - a[4], a[7])
    l = lat(url) if url else None
    if prev:
        dt = now - prev[0]
        cols = []
        for k in sorted(cur):
            if k in prev[1]:
                sc = 100.0 if k == '~cpu' else 1e9
                r = (cur[k][0]-prev[1][k][0])/sc/dt; w = (cur[k][1]-prev[1][k][1])/sc/dt
                cols.append(f'{k}:{r:.2f}/{w:.2f}')
        ls = ''
        if l and prev[2]:
            ls = f'del={l[0]-prev[2][0]} >25={l[1]-prev[2][1]} >50={l[2]-prev[2][2]}'
        f.write(f'{now-t0:6.2f} {ls:32s} ' + ' '.join(cols) + '\n'); f.flush()
    prev = (now, cur, l)
    time.sleep(max(0, 0.1 - (time.time()-now)))
