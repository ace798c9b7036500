"""Errors raised while a config is evaluated, told in one line: the problem and the config key."""

from __future__ import annotations

from types import TracebackType

from monai.bundle.config_item import ConfigItem


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from, outermost first."""
    chain = [exc]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
        chain.append(nxt)
    return chain


def _config_ids(tb: TracebackType | None) -> list[str]:
    ids = []
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, ConfigItem) and owner.get_id() and (not ids or ids[-1] != owner.get_id()):
            ids.append(owner.get_id())
        tb = tb.tb_next
    return ids


def failing_key(exc: BaseException) -> str | None:
    """The innermost config id whose evaluation or instantiation raised ``exc`` (None outside a config item)."""
    ids = [i for e in _chain(exc) for i in _config_ids(e.__traceback__)]
    return ids[-1] if ids else None


def one_line(exc: BaseException) -> str:
    """``<Error>: <message> (config key '<id>')`` for the root cause of ``exc``, on a single line."""
    root = _chain(exc)[-1]
    message = " ".join(str(root).split()) or repr(root)
    key = failing_key(exc)
    where = f" (config key '{key}')" if key else ""
    return f"{type(root).__name__}: {message}{where}"
