"""What the operator lets a node serve: the models it may serve and a ceiling on its capacity.

A node declares its models and ``max_concurrent`` in hello and in every
lease. The router believes a declaration only within the node's policy: a
model counts only if the node declares it ready AND the policy allows it, and
the node is given at most min(declared, ceiling) requests at once. The policy
comes from the join key at enrollment (`xim-router join-key create
--allow-model NAME --max-concurrent N`), is changed with `xim-router agents
set`, and lives in the store; this module is the pure part.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from xim_proto import codec

# The most requests at once any node may declare (at enrollment) or be given
# (on the link), whatever it claims: far above what one engine batches
# (ximd plans at most 256), far below what overflows anything.
MAX_CONCURRENT_LIMIT = 4096
MAX_MODEL_NAME = 256


@dataclass(frozen=True)
class NodePolicy:
    allowed_models: frozenset[str] | None = None    # None: any model the node declares
    max_concurrent: int | None = None               # the ceiling; None: only MAX_CONCURRENT_LIMIT

    def allows(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models

    def capacity(self, declared: int) -> int:
        """Requests the node is given at once: what it declares, within the ceiling and the limit."""
        return min(declared, self.max_concurrent or MAX_CONCURRENT_LIMIT, MAX_CONCURRENT_LIMIT)

    def permitted(self, models: Iterable[codec.Model]) -> list[codec.Model]:
        """The declared models the node may serve, in the node's order."""
        return [m for m in models if self.allows(m.name)]

    def refused(self, models: Iterable[codec.Model]) -> tuple[str, ...]:
        """Names the node declares but may not serve, sorted, each once."""
        return tuple(sorted({m.name for m in models if not self.allows(m.name)}))

    def describe(self) -> str:
        """In words, for the operator's terminal and the log."""
        models = ("any model" if self.allowed_models is None
                  else ", ".join(sorted(self.allowed_models)) or "no model")
        ceiling = (f"at most {self.max_concurrent} request(s) at once" if self.max_concurrent
                   else f"as many requests at once as it declares (at most {MAX_CONCURRENT_LIMIT})")
        return f"may serve {models}; {ceiling}"


def check_model_name(name: str) -> str:
    """A model name an operator may allow or assign; ValueError says what is wrong."""
    if not 0 < len(name) <= MAX_MODEL_NAME:
        raise ValueError(f"a model name is 1 to {MAX_MODEL_NAME} characters")
    if name.startswith("-") or not name.isprintable() or any(c.isspace() for c in name):
        raise ValueError(f"{name!r} is not a model name (no spaces, control characters or leading '-')")
    return name


def check_max_concurrent(value: int) -> int:
    """A max_concurrent in range; ValueError says the range."""
    if not 1 <= value <= MAX_CONCURRENT_LIMIT:
        raise ValueError(f"max_concurrent must be 1 to {MAX_CONCURRENT_LIMIT}")
    return value


def shown(names: Iterable[str], most: int = 5, width: int = 80) -> str:
    """Node-chosen names for a log line: escaped, each cut to ``width``, at most ``most`` of them."""
    names = list(names)
    parts = [repr(n[:width] + ("…" if len(n) > width else "")) for n in names[:most]]
    if len(names) > most:
        parts.append(f"and {len(names) - most} more")
    return ", ".join(parts)

