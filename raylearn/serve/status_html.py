"""The status page's HTML (one file, no build step; see :mod:`raylearn.serve.status_page`).

It loads plotly.js from ``ui/plotly.min.js`` (the ``plotly`` wheel's copy), asks ``v1/annotation/status`` every
``REFRESH_S`` seconds with the user's bearer token (``#token=...`` once, or typed; kept in the tab's
``sessionStorage``), and fetches each suggestion's thumbnail with the same token. URLs are relative, so the page
works under any Serve route prefix. Elements the browser test reads carry ids (``round``, ``model-version``,
``labelled``, ...) and the curve's ``data-points``.
"""

from __future__ import annotations

__all__ = ["PAGE", "REFRESH_S"]

REFRESH_S = 5

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>raylearn status</title>
<style>
 body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
 header{background:#1d2330;color:#fff;padding:10px 20px;display:flex;gap:16px;align-items:baseline}
 header h1{font-size:18px;margin:0} header .sub{opacity:.75}
 .badge{padding:2px 8px;border-radius:10px;font-size:12px;background:#6b7280}
 .badge.running{background:#15803d} .badge.finished{background:#1d4ed8} .badge.none{background:#b45309}
 main{padding:16px 20px;display:grid;grid-template-columns:minmax(420px,3fr) minmax(320px,2fr);gap:16px}
 section{background:#fff;border-radius:8px;padding:12px 16px;box-shadow:0 1px 2px rgba(0,0,0,.08);overflow-x:auto}
 section h2{font-size:14px;margin:0 0 8px;text-transform:uppercase;letter-spacing:.04em;color:#4b5563}
 .cards{grid-column:1/-1;display:flex;gap:12px;flex-wrap:wrap}
 .card{background:#fff;border-radius:8px;padding:10px 16px;min-width:120px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
 .card .v{font-size:22px;font-weight:600} .card .k{font-size:12px;color:#6b7280}
 table{border-collapse:collapse;width:100%} td,th{padding:4px 6px;border-bottom:1px solid #eef0f3;text-align:left}
 th{font-size:12px;color:#6b7280;font-weight:600} img.thumb{width:72px;image-rendering:pixelated;border-radius:4px}
 #message{grid-column:1/-1;padding:14px 16px;border-radius:8px;background:#fff7ed;border:1px solid #fdba74}
 #curve{height:360px} .muted{color:#6b7280} code{background:#eef0f3;padding:1px 4px;border-radius:3px}
</style>
<script src="ui/plotly.min.js"></script>
</head><body data-state="loading">
<header><h1>raylearn</h1><span id="run-name" class="sub">status</span>
 <span id="state" class="badge">loading</span><span class="sub" id="updated"></span></header>
<main>
 <div id="message" hidden></div>
 <form id="login" hidden style="grid-column:1/-1" onsubmit="return saveToken()">
  <section><h2>Token</h2><p>The page shows what the API shows: give your annotation token (the same bearer token as
  any client).</p><input id="token" type="password" size="40" autocomplete="off"> <button>Show status</button></section>
 </form>
 <div class="cards" id="cards" hidden>
  <div class="card"><div class="v" id="round">-</div><div class="k">round</div></div>
  <div class="card"><div class="v" id="model-version">-</div><div class="k">model version</div></div>
  <div class="card"><div class="v"><span id="labelled">-</span> / <span id="pool">-</span></div>
   <div class="k">labelled cases (<span id="labelled-pct">-</span>%)</div></div>
  <div class="card"><div class="v" id="fg-pct">-</div><div class="k">% of pool foreground labelled</div></div>
  <div class="card"><div class="v" id="annotation-time">-</div><div class="k">annotator time (timed labels)</div></div>
  <div class="card"><div class="v" id="strategy">-</div><div class="k">strategy / <span id="mode">-</span></div></div>
 </div>
 <section id="curve-box" hidden><h2>Learning curve</h2><div id="curve" data-points="0"></div>
  <div class="muted" id="reference-note"></div></section>
 <section id="suggest-box" hidden><h2>Next suggested cases</h2>
  <table><thead><tr><th></th><th>#</th><th>case</th><th>scores</th><th>held by</th></tr></thead>
  <tbody id="suggestions"></tbody></table><div class="muted" id="suggest-note"></div></section>
 <section id="lease-box" hidden><h2>Open leases</h2>
  <table><thead><tr><th>annotator</th><th>cases (expires in)</th></tr></thead>
  <tbody id="leases"></tbody></table></section>
 <section id="history-box" hidden><h2>Label history</h2>
  <table><thead><tr><th>time</th><th>case</th><th>v</th><th>tag</th><th>by</th><th>source</th><th>fg vox</th></tr>
  </thead><tbody id="history"></tbody></table></section>
</main>
<script>
const REFRESH_MS = __REFRESH_S__ * 1000;
const BASE = location.pathname.endsWith('/') ? location.pathname : location.pathname + '/';
const COLOURS = ['#e64b35', '#4dbbd5', '#00a087', '#f39b7f', '#8491b4', '#91d1c2'];
const thumbs = {};
(function takeFragmentToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) { sessionStorage.setItem('raylearn-token', decodeURIComponent(m[1]));
           history.replaceState(null, '', location.pathname + location.search); }
})();
function token() { return sessionStorage.getItem('raylearn-token') || ''; }
function saveToken() { sessionStorage.setItem('raylearn-token', document.getElementById('token').value.trim());
  refresh(); return false; }
function $(id) { return document.getElementById(id); }
function text(id, v) { $(id).textContent = (v === null || v === undefined) ? '-' : v; }
const ESC = {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'};
function esc(s) { return String(s).replace(/[&<>"']/g, c => ESC[c]); }
function fmt(v, d) { return (v === null || v === undefined || Number.isNaN(v)) ? '-' : Number(v).toFixed(d); }
function show(ids, on) { ids.forEach(i => { $(i).hidden = !on; }); }
const PANELS = ['cards', 'curve-box', 'suggest-box', 'lease-box', 'history-box'];

function setState(state, label) {
  document.body.dataset.state = state;
  const b = $('state'); b.textContent = label || state; b.className = 'badge ' + state;
}
function message(html) { $('message').innerHTML = html; $('message').hidden = !html; }

async function api(path) {
  return fetch(BASE + path, {headers: {'Authorization': 'Bearer ' + token()}, cache: 'no-store'});
}

async function refresh() {
  let r;
  try { r = await api('v1/annotation/status'); }
  catch (e) { setState('none', 'unreachable'); message('The server does not answer: ' + esc(e)); return; }
  if (r.status === 401 || r.status === 403) {
    show(PANELS, false); $('login').hidden = false; setState('none', 'token needed');
    message(token() ? 'That token was refused (' + r.status + ').' : ''); return;
  }
  $('login').hidden = true;
  const body = await r.json();
  if (r.status === 503) {
    show(PANELS, false); setState('none', 'nothing running');
    message('<b>Nothing is running.</b> ' + esc(body.detail || '') + '<br>The page refreshes every ' +
            (REFRESH_MS / 1000) + ' s and shows the run once a driver attaches one.');
    return;
  }
  if (!r.ok) { setState('none', 'error ' + r.status); message(esc(body.detail || r.statusText)); return; }
  message(''); show(PANELS, true); render(body);
}

function render(s) {
  setState(s.state, s.state + (s.paused ? ' (paused)' : ''));
  text('run-name', s.run); text('round', s.round); text('model-version', s.model_version);
  text('labelled', s.labelled); text('pool', s.pool); text('labelled-pct', fmt(s.cost.labelled_pct, 1));
  text('fg-pct', s.cost.fg_labelled_pct === null ? '-' : fmt(s.cost.fg_labelled_pct, 1) + '%');
  text('annotation-time', s.cost.timed_labels ? fmt(s.cost.annotation_s / 60, 1) + ' min' : '-');
  text('strategy', s.strategy); text('mode', s.mode + ', ' + s.oracle + ' oracle');
  text('updated', s.updated ? 'updated ' + new Date(s.updated * 1000).toLocaleTimeString() : '');
  drawCurve(s);
  drawSuggestions(s);
  $('leases').innerHTML = Object.entries(s.leases_by_user).map(([u, cs]) => '<tr><td>' + esc(u) + '</td><td>' +
    cs.map(c => esc(c.case_id) + ' (' + fmt(c.expires_in_s / 60, 0) + ' min)').join(', ') + '</td></tr>').join('')
    || '<tr><td colspan="2" class="muted">nobody holds a case</td></tr>';
  $('history').innerHTML = s.history.map(h => '<tr><td title="' + new Date(h.time * 1000).toLocaleString() + '">' +
    new Date(h.time * 1000).toLocaleTimeString() + '</td><td>' +
    esc(h.case_id) + '</td><td>' + h.version + '</td><td>' + esc(h.tag) + '</td><td>' + esc(h.annotator) +
    '</td><td>' + esc(h.source) + '</td><td>' + h.foreground_voxels + '</td></tr>').join('')
    || '<tr><td colspan="7" class="muted">no labels yet</td></tr>';
}

function drawCurve(s) {
  const c = s.learning_curve, x = c.map(p => 100 * p.fraction_labelled);
  const traces = [{x: x, y: c.map(p => p.dice_mean), name: 'mean Dice', mode: 'lines+markers',
                   line: {color: '#1d2330', width: 3},
                   text: c.map(p => 'round ' + p.round + ', ' + p.n_labeled + ' cases')}];
  Object.entries(s.curve_classes).forEach(([k, ys], i) => traces.push({x: x, y: ys, name: k.replace('dice_', ''),
    mode: 'lines', line: {color: COLOURS[i % COLOURS.length], dash: 'dot'}}));
  const shapes = [], ann = [];
  if (s.reference_dice !== null) {
    shapes.push({type: 'line', xref: 'paper', x0: 0, x1: 1, y0: s.reference_dice, y1: s.reference_dice,
                 line: {color: '#b91c1c', dash: 'dash'}});
    ann.push({xref: 'paper', x: 1, y: s.reference_dice, xanchor: 'right', yanchor: 'bottom', showarrow: false,
              text: 'full pool ' + fmt(s.reference_dice, 3), font: {color: '#b91c1c'}});
    $('reference-note').textContent = '';
  } else {
    $('reference-note').textContent = 'Full-pool line: not known yet (evaluate.full_data_reference; drawn once the ' +
      'reference is trained).';
  }
  Plotly.react('curve', traces, {margin: {l: 50, r: 10, t: 10, b: 45}, xaxis: {title: {text: '% of pool labelled'}},
    yaxis: {title: {text: 'test Dice'}, range: [0, 1]}, shapes: shapes, annotations: ann,
    legend: {orientation: 'h', y: -0.2}}, {displayModeBar: false, responsive: true});
  $('curve').dataset.points = String(c.length);
}

function drawSuggestions(s) {
  const rows = s.suggestions.map(g => '<tr><td><img class="thumb" data-case="' + esc(g.case_id) + '" alt=""></td><td>' +
    g.rank + '</td><td>' + esc(g.case_id) + '</td><td>' + (Object.entries(g.scores).map(([k, v]) => esc(k) + ' ' +
    fmt(v, 3)).join('<br>') || '-') + '</td><td>' + esc(g.leased_by || '') + '</td></tr>');
  $('suggestions').innerHTML = rows.join('');
  $('suggest-note').textContent = s.suggestions.length ? 'Thumbnails: middle axial slice, current model\\'s ' +
    'prediction overlaid.' : 'No open suggestions (every queued case is labelled).';
  document.querySelectorAll('img.thumb').forEach(img => loadThumb(img, img.dataset.case, s.model_version));
}

async function loadThumb(img, cid, version) {
  const key = cid + '@' + version;
  if (!thumbs[key]) {
    thumbs[key] = api('v1/annotation/thumbnail/' + encodeURIComponent(cid))
      .then(r => r.ok ? r.blob() : null).then(b => b ? URL.createObjectURL(b) : '');
  }
  const url = await thumbs[key];
  if (url) { img.src = url; img.dataset.loaded = '1'; }
}

refresh();
setInterval(refresh, REFRESH_MS);
</script>
</body></html>
""".replace("__REFRESH_S__", str(REFRESH_S))
