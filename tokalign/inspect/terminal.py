"""Per-token heatmap in the terminal (rich): each completion token on a background coloured by one
channel, a legend with the scale, and a header per sample (id, reward, verdict)."""

from __future__ import annotations

from tokalign.inspect.tokens import PALETTES, Channel, Inspection, TokenSample, interpolate


ENV_STYLE = "italic #555555 on #dcdcdc"  # a multi-turn episode's environment tokens (no values: not the model's)


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % rgb


def _ink(rgb: tuple[int, int, int]) -> str:
    # Black text on light backgrounds, white on dark ones (perceived luminance).
    return "black" if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else "white"


def visible(token: str) -> str:
    """Whitespace a reader can see: newlines as ↵ (and a real line break), tabs as →."""
    return token.replace("\n", "↵\n").replace("\t", "→")


def legend(channel: Channel, width: int = 24):
    from rich.text import Text

    text = Text(f"{channel.name}: {channel.label}  ")
    text.append(f"{channel.lo:+.3g} ")
    for i in range(width):
        rgb = interpolate(PALETTES[channel.name], i / (width - 1))
        text.append(" ", style=f"on {_hex(rgb)}")
    text.append(f" {channel.hi:+.3g}")
    if channel.note:
        text.append(f"   ({channel.note})", style="dim")
    return text


def header(s: TokenSample):
    from rich.text import Text

    t = Text()
    t.append(s.id, style="bold")
    if s.reward is not None:
        t.append(f"  reward {s.reward:.3g}")
    verdict = s.verdict_text()
    if verdict:
        t.append(f"  {verdict}", style="green" if "PASS" in verdict and "FAIL" not in verdict else "red")
    t.append(f"  {len(s.token_ids)} tokens, {s.finish_reason or '?'}", style="dim")
    return t


def tokens_text(s: TokenSample, channel: Channel):
    from rich.text import Text

    values = s.values.get(channel.name) or [None] * len(s.token_ids)
    text = Text()
    for t, (tok, v) in enumerate(zip(s.tokens, values)):
        rgb = channel.colour(v)
        style = ENV_STYLE if s.is_env(t) else f"{_ink(rgb)} on {_hex(rgb)}" if rgb else ""
        text.append(visible(tok) or "∅", style=style)
    return text


def render(result: Inspection, channel_name: str, console) -> None:
    from rich.text import Text

    channel = result.channels[channel_name]
    console.print(Text(f"{result.path} ({result.kind}, {len(result.samples)} samples, model {result.model or '(bundled)'})", style="dim"))
    console.print(legend(channel))
    for s in result.samples:
        console.print()
        console.print(header(s))
        console.print(Text(f"prompt: {s.prompt[-200:]}", style="dim"))
        console.print(tokens_text(s, channel))
