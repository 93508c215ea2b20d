"""The model ids a router may assign to a node: Hugging Face repo ids, nothing else.

A model reaches the node from the router (a join key's ``--model``, welcome's
``assigned_model``) and ends up in the engine's argv and in hub downloads. Only
an id of the hub's own shape passes — ``name`` or ``org/name`` of letters,
digits, ``-``, ``_`` and ``.``, each part starting with a letter or digit, no
``--`` or ``..``, at most 96 characters a part — so a path (``/etc/…``, ``../``)
or a flag (``--trust-remote-code``) never does. Both ends check: the router
before it stores one, the node before it serves one.
"""

from __future__ import annotations

import re

_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
MODEL_ID = re.compile(rf"^{_PART}(?:/{_PART})?$")


def is_model_id(text: object) -> bool:
    return (isinstance(text, str) and bool(MODEL_ID.fullmatch(text))
            and "--" not in text and ".." not in text)
