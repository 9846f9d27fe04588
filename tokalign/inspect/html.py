"""Per-token heatmap as ONE self-contained HTML file: inline CSS and JS, no network assets.

Every available channel is switchable in the page (buttons, or ``page.html#entropy``); hovering a
token shows its text, id and all its values. The page is coloured by the initial channel without JavaScript too (inline styles), the
script only recolours on a switch.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from tokalign.inspect.tokens import CHANNELS, PALETTES, Inspection

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;background:#fff;color:#222}
header{position:sticky;top:0;background:#f7f7f7;border-bottom:1px solid #ddd;padding:10px 16px;z-index:2}
h1{font-size:15px;margin:0 0 6px 0;font-weight:600}
.meta{font-size:12px;color:#666}
.channels{margin:8px 0 4px 0}
.channels button{font:inherit;font-size:13px;margin-right:6px;padding:3px 10px;border:1px solid #aaa;border-radius:4px;background:#fff;cursor:pointer}
.channels button.on{background:#333;color:#fff;border-color:#333}
.channels button:disabled{color:#aaa;border-color:#ddd;cursor:not-allowed}
.legend{display:flex;align-items:center;gap:8px;font-size:12px;margin-top:4px}
.bar{width:260px;height:14px;border:1px solid #ccc}
.note{color:#777}
main{padding:8px 16px}
.sample{border-bottom:1px solid #eee;padding:10px 0}
.head{font-size:13px}
.head .id{font-weight:600}
.pass{color:#1a7f37}.fail{color:#c0392b}
.prompt{font-size:12px;color:#777;margin:2px 0 6px 0;white-space:pre-wrap}
.toks{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:15px;line-height:1.9}
.tok{white-space:pre-wrap;padding:2px 1px;border-right:1px solid rgba(0,0,0,.12);cursor:default}
.tok:hover{outline:2px solid #000}
.tok.env{background:repeating-linear-gradient(135deg,#dcdcdc 0 4px,#f2f2f2 4px 8px)!important;color:#555!important;font-style:italic}
#tip{position:fixed;display:none;pointer-events:none;background:#222;color:#eee;font:12px ui-monospace,Menlo,monospace;padding:6px 8px;border-radius:4px;z-index:3;white-space:pre}
"""

_JS = """
const D = JSON.parse(document.getElementById('tokalign-data').textContent);
const tip = document.getElementById('tip');
function lerp(stops, t){
  t = Math.min(1, Math.max(0, t));
  for (let i = 0; i + 1 < stops.length; i++){
    const [p0, c0] = stops[i], [p1, c1] = stops[i + 1];
    if (t <= p1){ const f = p1 === p0 ? 0 : (t - p0) / (p1 - p0); return c0.map((a, k) => Math.round(a + (c1[k] - a) * f)); }
  }
  return stops[stops.length - 1][1];
}
function colour(name, v){
  const c = D.channels[name];
  if (v === null || v === undefined || !isFinite(v)) return null;
  const span = c.hi - c.lo;
  return lerp(D.palettes[name], span <= 0 ? 0.5 : (v - c.lo) / span);
}
function ink(rgb){ return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 ? '#000' : '#fff'; }
function fmt(v){ return v === null || v === undefined ? 'n/a' : (Math.abs(v) >= 1e-3 || v === 0 ? v.toFixed(4) : v.toExponential(2)); }
function show(name){
  const c = D.channels[name];
  document.querySelectorAll('.channels button').forEach(b => b.classList.toggle('on', b.dataset.ch === name));
  document.getElementById('lo').textContent = fmt(c.lo);
  document.getElementById('hi').textContent = fmt(c.hi);
  document.getElementById('label').textContent = c.label;
  document.getElementById('note').textContent = c.note;
  const stops = D.palettes[name].map(([p, rgb]) => `rgb(${rgb.join(',')}) ${p * 100}%`).join(',');
  document.getElementById('bar').style.background = `linear-gradient(to right, ${stops})`;
  document.querySelectorAll('.tok').forEach(el => {
    const s = D.samples[+el.dataset.s], vals = s.values[name];
    const rgb = vals ? colour(name, vals[+el.dataset.t]) : null;
    el.style.background = rgb ? `rgb(${rgb.join(',')})` : 'transparent';
    el.style.color = rgb ? ink(rgb) : '#222';
  });
  D.current = name;
}
document.querySelectorAll('.channels button').forEach(b => b.addEventListener('click', () => show(b.dataset.ch)));
document.querySelectorAll('.tok').forEach(el => {
  el.addEventListener('mousemove', e => {
    const s = D.samples[+el.dataset.s], t = +el.dataset.t;
    const lines = [`token ${JSON.stringify(s.tokens[t])}  id ${s.ids[t]}  #${t}`];
    if (el.classList.contains('env')) lines.push('environment token (loss mask 0: not sampled, not trained on)');
    for (const name of Object.keys(D.channels)){
      if (!D.channels[name].available) continue;
      const vals = s.values[name];
      lines.push(`${name.padEnd(9)} ${vals ? fmt(vals[t]) : 'n/a'}`);
    }
    tip.textContent = lines.join('\\n');
    tip.style.display = 'block';
    tip.style.left = Math.min(e.clientX + 14, window.innerWidth - tip.offsetWidth - 4) + 'px';
    tip.style.top = (e.clientY + 16) + 'px';
  });
  el.addEventListener('mouseleave', () => { tip.style.display = 'none'; });
});
// #CHANNEL in the address opens the page on that channel (a link to one view).
const wanted = decodeURIComponent(location.hash.slice(1));
show(D.channels[wanted] && D.channels[wanted].available ? wanted : D.current);
window.addEventListener('hashchange', () => { const c = location.hash.slice(1); if (D.channels[c] && D.channels[c].available) show(c); });
"""


def _round(v: float | None) -> float | None:
    if v is None or not math.isfinite(v):
        return None
    return float(f"{v:.5g}")


def _gradient(name: str) -> str:
    return ", ".join(f"rgb{rgb} {p * 100:g}%" for p, rgb in PALETTES[name])


def render(result: Inspection, channel_name: str) -> str:
    channels = {name: {"label": c.label, "available": c.available, "note": c.note, "lo": c.lo, "hi": c.hi}
                for name, c in result.channels.items()}
    data = {
        "current": channel_name,
        "channels": channels,
        "palettes": {name: [[p, list(rgb)] for p, rgb in stops] for name, stops in PALETTES.items()},
        "samples": [{"id": s.id, "tokens": s.tokens, "ids": s.token_ids,
                     "values": {n: ([_round(v) for v in s.values[n]] if s.values.get(n) is not None else None)
                                for n in CHANNELS if result.channels[n].available}}
                    for s in result.samples],
    }
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")  # no early </script>
    current = result.channels[channel_name]
    esc = html.escape
    buttons = "".join(
        f'<button data-ch="{n}" class="{"on" if n == channel_name else ""}"'
        f'{"" if c.available else " disabled"} title="{esc(c.note or c.label)}">{n}</button>'
        for n, c in result.channels.items())
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>tokalign inspect: {esc(str(result.path))}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>tokalign inspect — {esc(str(result.path))}</h1>",
        f'<div class="meta">{esc(result.kind)} artifact, {len(result.samples)} samples, model {esc(result.model or "(bundled)")}. '
        "Hover a token for its id and values; <code>#channel</code> in the address opens that channel."
        + (' <span class="tok env">hatched grey</span>: environment tokens (tool results, turn wrappers; not trained on).'
           if any(s.loss_mask is not None for s in result.samples) else "") + "</div>",
        f'<div class="channels">{buttons}</div>',
        f'<div class="legend"><span id="label">{esc(current.label)}</span><span id="lo">{current.lo:.4g}</span>'
        f'<div class="bar" id="bar" style="background:linear-gradient(to right, {_gradient(channel_name)})"></div>'
        f'<span id="hi">{current.hi:.4g}</span><span class="note" id="note">{esc(current.note)}</span></div></header><main>',
    ]
    for i, s in enumerate(result.samples):
        verdict = s.verdict_text()
        cls = "pass" if verdict and "FAIL" not in verdict else "fail"
        head = f'<span class="id">{esc(s.id)}</span>'
        if s.reward is not None:
            head += f" &nbsp;reward {s.reward:.4g}"
        if verdict:
            head += f' &nbsp;<span class="{cls}">{esc(verdict)}</span>'
        head += f' &nbsp;<span class="meta">{len(s.token_ids)} tokens, {esc(s.finish_reason or "?")}</span>'
        values = s.values.get(channel_name) or [None] * len(s.token_ids)
        toks = []
        for t, (tok, v) in enumerate(zip(s.tokens, values)):
            rgb = current.colour(v)
            style = (f' style="background:rgb{rgb};color:{"#000" if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else "#fff"}"'
                     if rgb else "")
            shown = esc(tok.replace("\t", "→")).replace("\n", "↵<br>") or "∅"
            kind = "tok env" if s.is_env(t) else "tok"
            toks.append(f'<span class="{kind}" data-s="{i}" data-t="{t}"{style}>{shown}</span>')
        parts.append(f'<div class="sample"><div class="head">{head}</div>'
                     f'<div class="prompt">prompt: {esc(s.prompt[-300:])}</div><div class="toks">{"".join(toks)}</div></div>')
    parts.append(f'</main><div id="tip"></div><script type="application/json" id="tokalign-data">{payload}</script>'
                 f"<script>{_JS}</script></body></html>\n")
    return "".join(parts)


def write(result: Inspection, channel_name: str, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(result, channel_name), encoding="utf-8")
    return out
