"""How exposed `xim-router serve`'s HTTP listeners are: what it refuses, what it warns about.

Pure: the CLI asks `assess` before anything binds, refuses (exit 2) what
`Exposure.refusal` names and logs every warning. The rules, per listener:

- loopback (127.0.0.0/8, ::1, localhost): nothing to say; only this host reaches it;
- any other address — a wildcard, a LAN address, a hostname (it may resolve to
  anything) — is public:
  - plain HTTP and no API keys: refused unless ``--allow-insecure-http``
    (anyone who reaches it uses the OpenAI API; join keys and agent tokens
    cross the network in clear);
  - TLS without API keys: a warning (anyone who reaches it uses the API);
  - API keys over plain HTTP: a warning (the keys cross the network in clear);
- a separate enrollment listener (``--enroll-http``) needs no API keys (the join
  key is its credential) but over plain HTTP on a public address carries join keys
  and tokens in clear: a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

from xim_proto.addresses import is_loopback_host

ALLOW_FLAG = "--allow-insecure-http"


@dataclass(frozen=True)
class Exposure:
    refusal: str | None            # why serve must not start, naming the flags; None = may start
    warnings: tuple[str, ...]      # unsafe but allowed: each goes to the log as a warning


def _shown(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def assess(http: tuple[str, int], enroll_http: tuple[str, int] | None, *, tls: bool,
           api_keys: bool, allow_insecure_http: bool) -> Exposure:
    """What serving on these listeners exposes; ``enroll_http`` None = enrollment on ``http``."""
    warnings: list[str] = []
    refusal = None
    api_where = _shown(*http)
    carries = "the OpenAI API" + ("" if enroll_http else " and enrollment")
    if not is_loopback_host(http[0]):
        in_clear = "API keys" if enroll_http else "API keys, join keys and agent tokens"
        if not tls and not api_keys:
            risk = (f"--http {api_where} is not a loopback address and would serve {carries} over "
                    "plain HTTP with no API key: anyone who can reach it could use the API"
                    + ("" if enroll_http else ", and join keys and agent tokens would cross the "
                                              "network in clear"))
            if allow_insecure_http:
                warnings.append(f"UNSAFE ({ALLOW_FLAG}): {risk}")
            else:
                refusal = (f"refusing to start: {risk}. Give --tls-cert/--tls-key and --api-key-file, "
                           f"or listen on 127.0.0.1 behind a TLS proxy, or pass {ALLOW_FLAG} to "
                           "accept the risk")
        elif not api_keys:
            warnings.append(f"UNSAFE: --http {api_where} is not a loopback address and {carries} "
                            "needs no API key: anyone who can reach it can use the API "
                            "(give --api-key-file)")
        elif not tls:
            warnings.append(f"UNSAFE: --http {api_where} is not a loopback address and serves plain "
                            f"HTTP: {in_clear} cross the network in clear (give --tls-cert/--tls-key)")
    if enroll_http and not is_loopback_host(enroll_http[0]) and not tls:
        warnings.append(f"UNSAFE: --enroll-http {_shown(*enroll_http)} is not a loopback address and "
                        "serves plain HTTP: join keys and agent tokens cross the network in clear "
                        "(give --tls-cert/--tls-key)")
    return Exposure(refusal, tuple(warnings))
