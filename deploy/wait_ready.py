"""Wait until the service answers 200 on /ready, or fail: the deploy's check after its restart.

    python3 deploy/wait_ready.py [--url URL] [--timeout SECONDS]

The URL defaults to /ready at KRAKEN_HOST:KRAKEN_PORT (as the service reads them; 127.0.0.1:8000
when unset, a wildcard host asked on loopback), so with the service's EnvironmentFile loaded it
asks where the service listens. Exit 0 with one line once it is ready; exit 1 with one line
saying what the last attempt got when --timeout passes first. Standard library only: it runs on
the host with any Python 3.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request

INTERVAL = 0.5  # between attempts: the service is usually up within seconds of its start
ATTEMPT_TIMEOUT = 5.0  # one request; a service that takes longer to answer is not ready


def default_url() -> str:
    host = os.environ.get("KRAKEN_HOST", "").strip() or "127.0.0.1"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # listening everywhere: ask on loopback
    if ":" in host:
        host = f"[{host}]"
    port = os.environ.get("KRAKEN_PORT", "").strip() or "8000"
    return f"http://{host}:{port}/ready"


def attempt(url: str, timeout: float) -> str | None:
    """None when ``url`` answers 200; else what it did instead, in a few words."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return None if answer.status == 200 else f"status {answer.status}"
    except urllib.error.HTTPError as exc:
        exc.close()
        return f"status {exc.code}"
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except OSError as exc:  # a reset or a timeout while reading the answer
        return str(exc) or type(exc).__name__


def wait_ready(url: str, timeout: float) -> str | None:
    """None once ``url`` answers 200 within ``timeout`` seconds; else the last attempt's failure."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        failure = attempt(url, max(0.1, min(ATTEMPT_TIMEOUT, remaining)))
        if failure is None:
            return None
        if time.monotonic() + INTERVAL >= deadline:
            return failure
        time.sleep(INTERVAL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="default: /ready at KRAKEN_HOST:KRAKEN_PORT")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    args = parser.parse_args(argv)
    url = args.url or default_url()
    if not url.startswith(("http://", "https://")):
        parser.error(f"--url {url!r}: an http:// or https:// URL")
    started = time.monotonic()
    failure = wait_ready(url, args.timeout)
    if failure is not None:
        sys.stderr.write(f"not ready: {url} did not answer 200 within {args.timeout:g} s (last attempt: {failure})\n")
        return 1
    sys.stdout.write(f"ready: {url} answered 200 after {time.monotonic() - started:.1f} s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
