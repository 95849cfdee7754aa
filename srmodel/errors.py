"""Errors raised by srmodel. Each message names the input at fault and the fix."""


class WeightsError(ValueError):
    """A weight file or folder cannot be loaded as the model it claims to be."""


class TimeBudgetExceeded(RuntimeError):
    """Denoising went past the caller's deadline (checked between steps): one input must not hold a GPU."""


def describe_key_problems(
    source: str,
    *,
    missing: list[str] = (),
    unexpected: list[str] = (),
    mismatched: list[tuple[str, tuple, tuple]] = (),
    hint: str = "",
    limit: int = 10,
) -> str:
    """One readable message listing the first `limit` keys of each kind of problem."""
    parts = [f"cannot load weights from {source}:"]

    def listed(title: str, items: list[str]) -> None:
        if items:
            shown = ", ".join(items[:limit])
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"  {len(items)} {title}: {shown}{more}")

    listed("missing keys", sorted(missing))
    listed("unexpected keys", sorted(unexpected))
    listed(
        "keys with the wrong shape",
        [f"{k} (file {tuple(got)}, model {tuple(want)})" for k, got, want in sorted(mismatched)],
    )
    if hint:
        parts.append(f"  {hint}")
    return "\n".join(parts)
