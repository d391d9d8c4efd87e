"""The search web page served at ``/``: a search box, an image upload, a grid of results."""
from __future__ import annotations

from retrieval.html import STYLE

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>clipalign search</title>
<style>%(style)s
form{display:flex;gap:8px;flex-wrap:wrap;align-items:center;margin-bottom:1rem}
#q{flex:1;min-width:16rem;font-size:1rem;padding:.5rem}
button{font-size:1rem;padding:.5rem 1rem}#status{color:#666;margin:.5rem 0}</style></head>
<body><h1>clipalign search</h1>
<form id="form"><input id="q" name="text" type="search" placeholder="describe an image, e.g. a red circle" autofocus>
<select id="over"><option value="images">images</option>%(captions)s</select>
<input id="k" type="number" min="1" max="%(max_k)d" value="12" style="width:4rem">
<button id="go" type="submit">Search</button>
<label>or by image: <input id="file" type="file" accept="image/*"></label></form>
<div id="status">%(count)d images indexed</div><div id="results" class="grid"></div>
<script>
const $ = (id) => document.getElementById(id);
function esc(s) { const d = document.createElement('div'); d.textContent = s; return d.innerHTML; }
function show(data) {
  $('status').textContent = data.error ? data.error : data.results.length + ' results';
  $('results').innerHTML = (data.results || []).map(h =>
    '<div class="hit"><img src="/thumb/' + h.id + '" alt="' + esc(h.caption) + '">' +
    '<div class="caption">' + esc(h.caption) + '</div><div><span class="score">' + h.score.toFixed(3) +
    '</span> · #' + h.rank + ' · ' + esc(h.key) + '</div></div>').join('');
}
async function run(resp) { show(await resp.json()); }
$('form').addEventListener('submit', (e) => {
  e.preventDefault();
  const p = new URLSearchParams({text: $('q').value, k: $('k').value, over: $('over').value});
  $('status').textContent = 'searching…';
  fetch('/search?' + p).then(run).catch(err => { $('status').textContent = String(err); });
});
$('file').addEventListener('change', () => {
  const f = $('file').files[0]; if (!f) return;
  const p = new URLSearchParams({k: $('k').value, over: $('over').value});
  fetch('/search?' + p, {method: 'POST', body: f, headers: {'Content-Type': f.type || 'application/octet-stream'}})
    .then(run).catch(err => { $('status').textContent = String(err); });
});
</script></body></html>
"""


def search_page(count: int, has_captions: bool, max_k: int) -> str:
    captions = '<option value="captions">captions</option>' if has_captions else ""
    return PAGE % {"style": STYLE, "captions": captions, "max_k": max_k, "count": count}
