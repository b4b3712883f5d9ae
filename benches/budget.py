"""Puts a `perf report --sort comm,dso,sym` (self time) into the stages of a proxied request and scales each
stage's share by the CPU per request of the profiled run and, given one, of a run without the profiler (the `ssp`
row of the load benchmark's table). Used by benches/budget.sh; the rules below are the method: the first rule a
sample's symbol or library matches wins."""

import re
import sys

# The stages that are the records' and the token step's own (issue 30's item 3).
RECORDS_AND_TOKEN = (
    "token (check 10: the JWT reader, base64)",
    "record encoding (record, JSON writer, numbers)",
    "kernel: writing the audit file",
    "chain hashing (SHA-256)",
    "audit: staging, slots, the writer",
)

RULES = [
    ("allocation and copies (glibc malloc, free, memmove, memcpy)",
     lambda d, s: "libc" in d and re.search(r"malloc|free|_int_|realloc|calloc|memmove|memcpy|memset|tcache|arena|unlink_chunk", s)),
    ("C library, other", lambda d, s: "libc" in d),
    ("chain hashing (SHA-256)", lambda d, s: re.search(r"sha2|sha256|Sha256", s)),
    ("TLS: AES-GCM and the rest of aws-lc", lambda d, s: re.search(r"aws_lc|aes_|gcm_|ghash|GFp|aws-lc", s + d)),
    ("TLS: rustls record layer", lambda d, s: "rustls" in s),
    ("token (check 10: the JWT reader, base64)", lambda d, s: re.search(r"ssp::jwt|base64", s)),
    ("record encoding (record, JSON writer, numbers)", lambda d, s: re.search(r"ssp::audit::record|json_writer|itoa|zmij", s)),
    ("audit: staging, slots, the writer", lambda d, s: "ssp::audit" in s),
    ("HTTP framing (hyper, httparse, http)", lambda d, s: re.search(r"hyper|httparse|\bhttp::|h2::", s)),
    ("event loop (tokio, mio)", lambda d, s: re.search(r"tokio|mio::", s)),
    ("checks, pipeline, forwarding, limits, metrics (ssp)",
     lambda d, s: re.search(r"ssp::|prometheus", s) and "kernel" not in d),
    # A regular file's write path only: `vfs_writev` and `do_writev` are the sockets' (`writev`; the audit log
    # writes with `write`), and the copy into the page cache is `copy_folio_from_iter_atomic`.
    ("kernel: writing the audit file", lambda d, s: "kernel" in d and not re.search(r"writev", s) and re.search(
        r"ext4|vfs_write|generic_perform_write|file_write|jbd2|filemap|iomap|xfs|btrfs|ksys_write|"
        r"copy_folio_from_iter|block_write|block_commit|create_empty_buffers|balance_dirty|__es_|dquot|"
        r"folio_wait_stable", s)),
    ("kernel: waking and scheduling (futex, context switches)", lambda d, s: "kernel" in d and re.search(r"futex|schedule|switch|wake|ttwu|enqueue|dequeue|pick_next|update_curr|__sched|finish_task", s)),
    ("kernel: epoll", lambda d, s: "kernel" in d and re.search(r"epoll|ep_", s)),
    ("kernel: system call entry and exit", lambda d, s: "kernel" in d and re.search(r"entry_SYSCALL|syscall_exit|do_syscall|syscall_return|__x64_sys|exit_to_user", s)),
    ("kernel: TCP/IP, copies and the rest", lambda d, s: "kernel" in d),
    ("other user space (core, alloc, bytes, ...)", lambda d, s: True),
]


def cpu_per_request(bench_text):
    """The `ssp` row's CPU per request (µs) of the scenario table."""
    for line in bench_text.splitlines():
        fields = line.split()
        if fields and fields[0] == "ssp" and len(fields) > 6 and fields[1].isdigit():
            return float(fields[5])
    raise SystemExit("no ssp row in the benchmark's output")


def main():
    bench, scenario = sys.argv[1], sys.argv[2]
    cpu = cpu_per_request(open(bench).read())
    # Without the profiler, when that run's table is given; else the profiled run's figure stands for both.
    plain = cpu_per_request(open(sys.argv[3]).read()) if len(sys.argv) > 3 else cpu
    stages, threads, total = {}, {}, 0.0
    # The records' and the token's samples on the request path (the workers and `ssp-audit`, which writes what
    # they hand it), and on `ssp-audit-sync` (the batched fsyncs, the page cache written back).
    records, synced = 0.0, 0.0
    line_re = re.compile(r"^\s*([\d.]+)%\s+(\S+)\s+(\S+)\s+\[[.k]\]\s+(.*)$")
    for line in sys.stdin:
        m = line_re.match(line)
        if not m:
            continue
        share, comm, dso, sym = float(m.group(1)), m.group(2), m.group(3), m.group(4)
        total += share
        thread = re.sub(r"-\d+$", "", comm)
        threads[thread] = threads.get(thread, 0.0) + share
        for name, rule in RULES:
            if rule(dso, sym):
                stages[name] = stages.get(name, 0.0) + share
                if name in RECORDS_AND_TOKEN:
                    if thread == "ssp-audit-sync":
                        synced += share
                    else:
                        records += share
                break
    print(f"\nCPU budget of a request, {scenario}: {cpu:.1f} us measured (/proc) while profiled, {plain:.1f} us "
          f"without the profiler; every sample in one stage")
    print("| stage | share | us per request, profiled | us per request, without the profiler |")
    print("|---|---|---|---|")
    for name, share in sorted(stages.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {share / total * 100:.1f}% | {share / total * cpu:.2f} | {share / total * plain:.2f} |")
    print(f"| total | 100% | {cpu:.2f} | {plain:.2f} |")
    print(f"\nthe records and the token step: {records / total * 100:.1f}%, {records / total * cpu:.2f} us profiled "
          f"and {records / total * plain:.2f} us without the profiler, on the request path (workers, ssp-audit); "
          f"the fsync thread's share of those stages {synced / total * 100:.1f}%, {synced / total * plain:.2f} us")
    print("\nby thread (profiled): " + ", ".join(f"{t} {s / total * cpu:.2f} us ({s / total * 100:.1f}%)" for t, s in sorted(threads.items(), key=lambda kv: -kv[1])))


main()
