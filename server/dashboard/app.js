// Qflow's dashboard: a small single-page app over the HTTP API, with no
// framework and nothing from outside the binary. Pages: overview (the
// metrics document and its history), flows (the plan as a graph,
// recommendations, an optimize preview, a run button), runs (a live list
// and each run's timeline) and plugins. Live updates come from the
// server-sent events of /api/v1/events.
'use strict';

// Every error the page meets is kept here (the browser tests read it) and
// shown where it happened.
window.__qflowErrors = [];
const remember = (what) => window.__qflowErrors.push(String(what && what.message || what));
window.addEventListener('error', (e) => remember(e.message));
window.addEventListener('unhandledrejection', (e) => remember(e.reason));
const consoleError = console.error.bind(console);
console.error = (...args) => { remember(args.join(' ')); consoleError(...args); };

const $ = (selector, root = document) => root.querySelector(selector);
const esc = (text) => String(text ?? '').replace(/[&<>"']/g, (c) =>
  ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
const fmt = {
  ms: (v) => v == null ? '–' : v >= 1000 ? (v / 1000).toFixed(2) + ' s' : v.toFixed(v < 10 ? 2 : 1) + ' ms',
  pct: (v) => v == null ? '–' : (100 * v).toFixed(1) + '%',
  num: (v) => v == null ? '–' : Number(v).toLocaleString('en'),
  time: (t) => t ? new Date(t).toLocaleTimeString('en-GB') : '–',
  when: (t) => t ? new Date(t).toLocaleString('en-GB') : '–',
};
const badge = (status) => `<span class="badge ${esc(status)}">${esc(status)}</span>`;

// The token, when the server wants one (it does off loopback).
let token = sessionStorage.getItem('qflow-token');
function askToken() {
  const given = window.prompt('This server wants a token (QFLOW_TOKEN):');
  if (given) { token = given; sessionStorage.setItem('qflow-token', given); }
}

/** A JSON request to the API; a failure throws with the server's message. */
async function api(path, options = {}) {
  const headers = { accept: 'application/json' };
  if (options.body !== undefined) headers['content-type'] = 'application/json';
  if (token) headers.authorization = 'Bearer ' + token;
  const response = await fetch('/api/v1' + path, {
    method: options.method || 'GET',
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  if (response.status === 401) { askToken(); throw new Error('the server wants a token'); }
  const text = await response.text();
  const body = text ? JSON.parse(text) : null;
  if (!response.ok) throw new Error((body && body.message) || response.statusText);
  return body;
}

/** Follows the server's events matching `query` (such as `?run=ID`); returns
 * what stops following. Read with fetch, so that a token can go along. */
function follow(query, onEvent) {
  const controller = new AbortController();
  (async () => {
    try {
      const headers = token ? { authorization: 'Bearer ' + token } : {};
      const response = await fetch('/api/v1/events' + query, { headers, signal: controller.signal });
      live(+1);
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const frame = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = frame.split('\n').filter((l) => l.startsWith('data:'))
            .map((l) => l.slice(5).trimStart()).join('\n');
          if (data) onEvent(JSON.parse(data));
        }
      }
    } catch (e) {
      if (e.name !== 'AbortError') remember(e);
    } finally {
      live(-1);
    }
  })();
  return () => controller.abort();
}

let following = 0;
function live(change) {
  following += change;
  $('#live').classList.toggle('on', following > 0);
}

/** Calls `f` at most once per `ms`, last call winning. */
function debounce(f, ms) {
  let timer = null;
  const call = () => { clearTimeout(timer); timer = setTimeout(f, ms); };
  call.cancel = () => clearTimeout(timer);
  return call;
}

// ── Charts ──────────────────────────────────────────────────────────────

const PALETTE = ['#2f6fed', '#1a9b5f', '#d13c3c', '#c98a00', '#8a4ee6', '#0f9bb3', '#e06cab'];

/** A line chart of `series` ({name, points: [[ms, y], …]}) over time. */
function lineChart(series, { format = (v) => v.toFixed(2), max, title } = {}) {
  const drawn = series.filter((s) => s.points.length);
  if (!drawn.length) return `<div class="empty">no data yet</div>`;
  const W = 560, H = 190, L = 52, R = 12, T = 12, B = 26;
  const all = drawn.flatMap((s) => s.points);
  let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
  if (x1 === x0) { x0 -= 5000; x1 += 5000; }
  let top = max ?? Math.max(...all.map((p) => p[1]));
  if (!(top > 0)) top = 1;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - y / top) * (H - T - B);
  let svg = `<svg viewBox="0 0 ${W} ${H}" role="img" aria-label="${esc(title || 'chart')}">`;
  for (let k = 0; k <= 4; k++) {
    const y = (top * k) / 4;
    svg += `<line x1="${L}" x2="${W - R}" y1="${sy(y)}" y2="${sy(y)}" stroke="#e3e6ec"/>`;
    svg += `<text x="${L - 6}" y="${sy(y) + 4}" text-anchor="end">${esc(format(y))}</text>`;
  }
  svg += `<text x="${L}" y="${H - 6}">${esc(fmt.time(x0))}</text>`;
  svg += `<text x="${W - R}" y="${H - 6}" text-anchor="end">${esc(fmt.time(x1))}</text>`;
  drawn.forEach((s, i) => {
    const color = PALETTE[i % PALETTE.length];
    const points = s.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(' ');
    svg += `<polyline fill="none" stroke="${color}" stroke-width="2" points="${points}"/>`;
    if (s.points.length <= 80) {
      for (const p of s.points) {
        svg += `<circle cx="${sx(p[0]).toFixed(1)}" cy="${sy(p[1]).toFixed(1)}" r="2.5" fill="${color}"/>`;
      }
    }
  });
  svg += '</svg>';
  const legend = drawn.map((s, i) =>
    `<span><i style="background:${PALETTE[i % PALETTE.length]}"></i>${esc(s.name)}</span>`).join('');
  return svg + `<div class="legend">${legend}</div>`;
}

const card = (title, body) => `<div class="card"><h3>${esc(title)}</h3>${body}</div>`;
const tile = (label, value, sub = '', size = '') =>
  `<div class="tile"><div class="label">${esc(label)}</div><div class="value ${size}">${esc(value)}</div>` +
  `<div class="sub">${esc(sub)}</div></div>`;

// ── Pages ───────────────────────────────────────────────────────────────

const pages = {};

pages.overview = async (main) => {
  const draw = async () => {
    const [metrics, history, runs] = await Promise.all([
      api('/optimization/metrics'),
      api('/optimization/metrics/history?limit=720'),
      api('/runs?limit=300'),
    ]);
    const ex = metrics.executionOptimization, lazy = metrics.lazyLoading, wasm = metrics.resourcePools.wasm;
    const tiles = [
      tile('Runs', fmt.num(ex.runs), `${fmt.num(ex.parallelExecutionCount)} in parallel`),
      tile('Average run', fmt.ms(ex.averageExecutionTime)),
      tile('Saved by parallelism', fmt.ms(ex.optimizationSavings), 'step time − wall time'),
      tile('Component cache hits', fmt.pct(lazy.hitRate), `${fmt.num(lazy.totalEntries)} compiled in memory`),
      tile('Cache memory', fmt.pct(lazy.memoryUsage), `${fmt.num(lazy.diskHits)} from disk, ${fmt.num(lazy.compiles)} compiled`),
      tile('Pool utilization', fmt.pct(ex.resourcePoolUtilization), `${fmt.num(wasm.inUseResources)} of ${fmt.num(wasm.totalResources)} instances`),
      tile('Acquisition p99', fmt.ms(wasm.p99AcquisitionTime), `${fmt.num(wasm.acquisitionCount)} acquisitions`),
      tile('Optimization level', metrics.optimizationLevel, metrics.optimizationEnabled ? 'enabled' : 'off'),
    ].join('');
    const at = (snapshot) => snapshot.at_ms;
    const efficiency = runs.filter((r) => r.efficiency != null)
      .map((r) => [Date.parse(r.started_at), r.efficiency]).reverse();
    const byFlow = {};
    for (const [x, y] of efficiency) { (byFlow.all = byFlow.all || []).push([x, y]); }
    const keys = new Set();
    for (const s of history) for (const p of s.document.resourcePools.wasm.byKey) keys.add(p.key);
    const poolKeys = [...keys].slice(0, 6);
    const perPool = (value) => poolKeys.map((key) => ({
      name: key,
      points: history.flatMap((s) => {
        const pool = s.document.resourcePools.wasm.byKey.find((p) => p.key === key);
        const y = pool && value(pool.stats);
        return y == null ? [] : [[at(s), y]];
      }),
    }));
    const series = (name, value) => ({ name, points: history.map((s) => [at(s), value(s.document)]) });
    main.innerHTML = `
      <h1>Overview</h1>
      <div class="tiles" id="tiles">${tiles}</div>
      <h2>Over time</h2>
      <div class="charts">
        ${card('Parallel efficiency per run', lineChart([{ name: 'efficiency', points: byFlow.all || [] }], { max: 1, format: (v) => v.toFixed(2), title: 'efficiency' }))}
        ${card('Pool utilization (in use / alive), per pool', lineChart(perPool((s) => s.total ? s.in_use / s.total : 0), { max: 1, format: fmt.pct, title: 'pool utilization' }))}
        ${card('Acquisition p99, per pool', lineChart(perPool((s) => s.acquire_p99_us / 1000), { format: (v) => v.toFixed(2) + ' ms', title: 'acquisition p99' }))}
        ${card('Component cache: hit rate and memory used', lineChart([
          series('hit rate', (d) => d.lazyLoading.hitRate),
          series('memory used', (d) => d.lazyLoading.memoryUsage),
        ], { max: 1, format: fmt.pct, title: 'cache' }))}
        ${card('Time saved by parallel execution (in all)', lineChart([
          series('saved', (d) => d.executionOptimization.optimizationSavings),
        ], { format: (v) => fmt.ms(v), title: 'savings' }))}
      </div>
      <p class="muted">Snapshots are taken every 10 s while runs end (${history.length} so far); efficiency is per run.</p>`;
  };
  await draw();
  main.dataset.ready = 'overview';
  const redraw = debounce(() => draw().catch(remember), 1500);
  const stop = follow('?type=q.qflow.run.finished', redraw);
  return () => { stop(); redraw.cancel(); };
};

pages.flows = async (main, id) => (id ? flowPage(main, id) : flowList(main));

async function flowList(main) {
  const flows = await api('/flows');
  const rows = flows.map((f) => `
    <tr data-href="#/flows/${encodeURIComponent(f.id)}" data-flow="${esc(f.id)}">
      <td><b>${esc(f.id)}</b></td><td>${esc(f.description || '')}</td>
      <td class="num">${esc(f.steps)}</td><td>${esc(f.max_parallel ?? 'all')}</td><td>${esc(f.format)}</td>
    </tr>`).join('');
  main.innerHTML = `<h1>Flows</h1>` + (flows.length
    ? `<div class="scroll"><table id="flows-table"><tr><th>flow</th><th>description</th><th>steps</th><th>max parallel</th><th>format</th></tr>${rows}</table></div>`
    : `<div class="empty">No flows: register one with POST /api/v1/flows, or serve a directory with --flows.</div>`);
  main.dataset.ready = 'flows';
}

/** The plan as a graph: a column per parallel group, the critical path
 * drawn in the accent colour. */
function planGraph(plan, graph) {
  const colW = 190, rowH = 56, boxW = 150, boxH = 38, pad = 16;
  const position = {};
  plan.groups.forEach((group, col) => group.forEach((id, row) => {
    position[id] = { x: pad + col * colW, y: pad + row * rowH };
  }));
  const rows = Math.max(1, ...plan.groups.map((g) => g.length));
  const W = pad * 2 + Math.max(1, plan.groups.length) * colW - (colW - boxW);
  const H = pad * 2 + rows * rowH - (rowH - boxH);
  const critical = new Set(plan.critical_path);
  const onPath = (a, b) => {
    const i = plan.critical_path.indexOf(a);
    return i >= 0 && plan.critical_path[i + 1] === b;
  };
  let svg = `<svg id="plan-graph" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}">`;
  for (const step of graph) {
    for (const need of step.needs) {
      const a = position[need], b = position[step.id];
      if (!a || !b) continue;
      const x1 = a.x + boxW, y1 = a.y + boxH / 2, x2 = b.x, y2 = b.y + boxH / 2, mid = (x1 + x2) / 2;
      const hot = onPath(need, step.id);
      svg += `<path d="M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}" fill="none" ` +
        `stroke="${hot ? '#2f6fed' : '#b8c0cf'}" stroke-width="${hot ? 2.5 : 1.2}"/>`;
    }
  }
  for (const step of graph) {
    const p = position[step.id];
    if (!p) continue;
    const hot = critical.has(step.id);
    svg += `<g class="node${hot ? ' critical' : ''}" data-step="${esc(step.id)}">` +
      `<rect x="${p.x}" y="${p.y}" width="${boxW}" height="${boxH}" rx="7" fill="${hot ? '#e7efff' : '#fff'}" ` +
      `stroke="${hot ? '#2f6fed' : '#cfd5df'}" stroke-width="${hot ? 2 : 1}"/>` +
      `<text x="${p.x + 10}" y="${p.y + 16}" style="fill:#1d2330;font-weight:600">${esc(step.id.slice(0, 20))}</text>` +
      `<text x="${p.x + 10}" y="${p.y + 30}">${esc(step.plugin.slice(0, 22))}</text></g>`;
  }
  return svg + '</svg>';
}

/** A unified diff, coloured. */
const diffView = (diff) => `<pre id="diff">${diff.split('\n').map((line) => {
  const kind = line.startsWith('@@') ? 'hunk' : line.startsWith('+') ? 'add' : line.startsWith('-') ? 'del' : '';
  return kind ? `<span class="${kind}">${esc(line)}</span>` : esc(line);
}).join('\n')}</pre>`;

async function flowPage(main, id) {
  const [flow, recs] = await Promise.all([
    api(`/flows/${encodeURIComponent(id)}`),
    api(`/flows/${encodeURIComponent(id)}/recommendations`),
  ]);
  const plan = flow.plan;
  const recommendations = recs.recommendations.length
    ? recs.recommendations.map((r) => `<div class="rec"><div class="kind">${esc(r.kind)}</div>` +
        `<div>${esc(r.message)}</div><code class="muted">${esc(JSON.stringify(r.evidence))}</code></div>`).join('')
    : `<p class="muted">Nothing to recommend from ${recs.runs} run(s).</p>`;
  main.innerHTML = `
    <h1>${esc(flow.id)} <span class="muted">${esc(flow.description || '')}</span></h1>
    <div class="row">
      <div class="card">
        <h3>Run it</h3>
        <div class="filters">
          <input id="run-input" value="null" aria-label="input (JSON)" style="flex:1">
          <button id="run-button">Run</button>
        </div>
        <div id="run-message" class="muted"></div>
      </div>
      <div class="card">
        <h3>Plan</h3>
        <div class="muted">${plan.groups.length} groups · critical path ${esc(plan.critical_path.join(' → '))}
          (${fmt.ms(plan.critical_path_ms)}${plan.estimated ? ', from past runs' : ', one unit a step'}) ·
          parallelization ${plan.parallelization.toFixed(2)}</div>
      </div>
    </div>
    <h2>Graph</h2>
    <div class="card scroll">${planGraph(plan, flow.graph)}</div>
    <h2>Recommendations</h2>
    <div class="card" id="recommendations">${recommendations}</div>
    <h2>Optimize (preview)</h2>
    <div class="card">
      <div class="filters">
        <select id="level" aria-label="level">
          <option>conservative</option><option selected>balanced</option><option>aggressive</option>
        </select>
        <button id="preview" class="secondary">Preview</button>
      </div>
      <div id="optimized"></div>
    </div>
    <h2>Flow file</h2>
    <pre>${esc(flow.text)}</pre>`;
  $('#run-button').onclick = async () => {
    try {
      const input = JSON.parse($('#run-input').value || 'null');
      const started = await api(`/flows/${encodeURIComponent(id)}/runs`, { method: 'POST', body: { input, wait: false } });
      location.hash = `#/runs/${encodeURIComponent(started.run_id)}`;
    } catch (e) {
      $('#run-message').innerHTML = `<span class="error">${esc(e.message)}</span>`;
    }
  };
  $('#preview').onclick = async () => {
    const out = $('#optimized');
    try {
      const result = await api(`/flows/${encodeURIComponent(id)}/optimize`, {
        method: 'POST', body: { level: $('#level').value, apply: false },
      });
      const changes = result.changes.length
        ? '<ul>' + result.changes.map((c) => `<li><b>${esc(c.what)}</b> — ${esc(c.reason)}</li>`).join('') + '</ul>'
        : '<p class="muted">No change at this level.</p>';
      out.innerHTML = changes + (result.diff ? diffView(result.diff) : '');
    } catch (e) {
      out.innerHTML = `<span class="error">${esc(e.message)}</span>`;
    }
  };
  main.dataset.ready = 'flow';
}

pages.runs = async (main, id) => (id ? runPage(main, id) : runList(main));

async function runList(main) {
  const flows = await api('/flows');
  const state = { flow: '', status: '' };
  main.innerHTML = `
    <h1>Runs</h1>
    <div class="filters">
      <select id="flow-filter" aria-label="flow"><option value="">every flow</option>
        ${flows.map((f) => `<option>${esc(f.id)}</option>`).join('')}</select>
      <select id="status-filter" aria-label="status"><option value="">every state</option>
        ${['running', 'succeeded', 'failed', 'cancelled', 'interrupted'].map((s) => `<option>${s}</option>`).join('')}</select>
    </div>
    <div class="scroll" id="runs"></div>`;
  const draw = async () => {
    const query = new URLSearchParams({ limit: '100' });
    if (state.flow) query.set('flow', state.flow);
    if (state.status) query.set('status', state.status);
    const runs = await api('/runs?' + query);
    $('#runs').innerHTML = runs.length ? `<table id="runs-table">
      <tr><th>run</th><th>flow</th><th>state</th><th>started</th><th>wall</th><th>efficiency</th><th>steps</th></tr>
      ${runs.map((r) => `<tr data-href="#/runs/${encodeURIComponent(r.run_id)}" data-run="${esc(r.run_id)}" data-status="${esc(r.status)}">
        <td class="mono">${esc(r.run_id.slice(0, 8))}</td><td>${esc(r.flow)}</td><td>${badge(r.status)}</td>
        <td>${esc(fmt.when(r.started_at))}</td><td class="num">${fmt.ms(r.wall_ms)}</td>
        <td class="num">${r.efficiency == null ? '–' : r.efficiency.toFixed(2)}</td>
        <td class="num">${r.steps ?? '–'}${r.failed_steps ? ` <span class="error">(${r.failed_steps} failed)</span>` : ''}</td></tr>`).join('')}
      </table>` : `<div class="empty">No runs${state.flow || state.status ? ' match' : ' yet'}.</div>`;
  };
  $('#flow-filter').onchange = (e) => { state.flow = e.target.value; draw().catch(remember); };
  $('#status-filter').onchange = (e) => { state.status = e.target.value; draw().catch(remember); };
  await draw();
  main.dataset.ready = 'runs';
  // A run that starts or ends anywhere shows up here at once.
  const redraw = debounce(() => draw().catch(remember), 200);
  const stop = follow('?type=q.qflow.run.', redraw);
  return () => { stop(); redraw.cancel(); };
}

/** One line on what an event says: its step or plugin, and the figures it carries. */
function eventDetail(d) {
  const parts = [];
  if (d.flow) parts.push(d.flow);
  if (d.step) parts.push(d.step);
  if (d.plugin && d.plugin !== d.step) parts.push(d.plugin);
  if (d.status) parts.push(d.status);
  if (d.source) parts.push(`from ${d.source}`);
  if (d.attempt != null) parts.push(`attempt ${d.attempt}`);
  if (d.delay_ms != null) parts.push(`after ${d.delay_ms} ms`);
  if (d.ms != null) parts.push(fmt.ms(d.ms));
  if (d.group != null) parts.push(`group ${d.group}: ${(d.steps || []).join(', ')}`);
  else if (d.steps != null) parts.push(`${d.steps} steps`);
  if (d.efficiency != null) parts.push(`efficiency ${d.efficiency.toFixed(2)}`);
  if (d.wall_ms != null) parts.push(`wall ${fmt.ms(d.wall_ms)}`);
  if (d.error) parts.push(typeof d.error === 'string' ? d.error : (d.error.message || ''));
  return parts.join(' · ');
}

/** A run's timeline: a bar per step from its first attempt's start to its
 * last attempt's end, retries marked where they waited. */
function gantt(summary, events) {
  const steps = summary.steps;
  const total = Math.max(summary.wall_ms, ...steps.map((s) => s.end_ms || 0), 1);
  const started = events.find((e) => e.type === 'q.qflow.run.started.v1');
  const t0 = started ? Date.parse(started.time) : null;
  const labelW = 130, W = 860, rowH = 26, top = 22;
  const sx = (ms) => labelW + (ms / total) * (W - labelW - 16);
  const H = top + steps.length * rowH + 10;
  const colors = { succeeded: '#1a9b5f', failed: '#d13c3c', cancelled: '#98a2b3', skipped: '#d0d5dd' };
  let svg = `<svg id="timeline" class="gantt" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}">`;
  for (let k = 0; k <= 4; k++) {
    const ms = (total * k) / 4;
    svg += `<line x1="${sx(ms)}" x2="${sx(ms)}" y1="${top - 6}" y2="${H - 6}" stroke="#eef0f4"/>` +
      `<text x="${sx(ms)}" y="12" text-anchor="middle">${esc(fmt.ms(ms))}</text>`;
  }
  steps.forEach((s, i) => {
    const y = top + i * rowH;
    svg += `<text x="4" y="${y + 15}" style="fill:#1d2330">${esc(s.id.slice(0, 18))}</text>`;
    if (s.start_ms != null && s.end_ms != null) {
      const w = Math.max(2, sx(s.end_ms) - sx(s.start_ms));
      const phases = s.load_ms != null ? ` (load ${fmt.ms(s.load_ms)}, run ${fmt.ms(s.run_ms || 0)})` : '';
      svg += `<rect class="bar" data-step="${esc(s.id)}" data-status="${esc(s.status)}" x="${sx(s.start_ms)}" y="${y + 4}" ` +
        `width="${w}" height="${rowH - 9}" fill="${colors[s.status] || '#2f6fed'}"><title>${esc(s.id)}: ` +
        `${esc(s.status)}, ${s.attempts} attempt(s), ${esc(fmt.ms(s.end_ms - s.start_ms))}${esc(phases)}</title></rect>`;
      // The load phase (its plugin loaded or compiled, its first instance
      // made) as the pale start of the bar.
      if (s.load_ms > 0) {
        const lw = Math.min(w, Math.max(1, sx(s.start_ms + s.load_ms) - sx(s.start_ms)));
        svg += `<rect class="load" x="${sx(s.start_ms)}" y="${y + 4}" width="${lw}" height="${rowH - 9}">` +
          `<title>${esc(s.id)}: load ${esc(fmt.ms(s.load_ms))} (plugin and first instance)</title></rect>`;
      }
    } else {
      svg += `<text x="${labelW}" y="${y + 15}">${esc(s.status)}</text>`;
    }
    if (t0 != null) {
      for (const e of events) {
        if (e.type !== 'q.qflow.step.retrying.v1' || e.data.step !== s.id) continue;
        const at = Date.parse(e.time) - t0;
        svg += `<line x1="${sx(at)}" x2="${sx(at + e.data.delay_ms)}" y1="${y + 12}" y2="${y + 12}" ` +
          `stroke="#c98a00" stroke-width="3" stroke-dasharray="3 2"><title>retry ${e.data.attempt} after ` +
          `${e.data.delay_ms} ms: ${esc(e.data.error)}</title></line>`;
      }
    }
  });
  return svg + '</svg>';
}

async function runPage(main, id) {
  let stop = () => {};
  const draw = async () => {
    const record = await api(`/runs/${encodeURIComponent(id)}`);
    const summary = record.summary;
    const head = `
      <h1>Run <span class="mono">${esc(record.run_id)}</span></h1>
      <div class="tiles">
        ${tile('Flow', record.flow, '', 'small')}
        <div class="tile"><div class="label">State</div><div class="value" id="run-status" data-status="${esc(record.status)}">${badge(record.status)}</div></div>
        ${tile('Started', fmt.when(record.started_at), '', 'small')}
        ${tile('Wall time', fmt.ms(summary && summary.wall_ms), summary ? `efficiency ${summary.efficiency.toFixed(2)}` : '')}
      </div>`;
    if (!summary) {
      // In flight (or it never started): its steps as their events come.
      main.innerHTML = head + (record.error
        ? `<p class="error">${esc(record.error)}</p>`
        : `<h2>Steps, live</h2><div class="card" id="live-steps"><p class="muted">waiting for its steps…</p></div>`);
      if (record.status === 'running' && !record.error) {
        const states = {};
        const show = () => {
          $('#live-steps').innerHTML = `<table>${Object.entries(states).map(([step, s]) =>
            `<tr data-step="${esc(step)}"><td>${esc(step)}</td><td>${badge(s)}</td></tr>`).join('')}</table>`;
        };
        stop();
        stop = follow(`?run=${encodeURIComponent(id)}`, (e) => {
          if (e.type === 'q.qflow.step.started.v1') { states[e.data.step] = 'running'; show(); }
          if (e.type === 'q.qflow.step.finished.v1') { states[e.data.step] = e.data.status; show(); }
          if (e.type === 'q.qflow.run.finished.v1') { stop(); setTimeout(() => draw().catch(remember), 150); }
        });
        // It may have ended between the read and the subscription.
        setTimeout(async () => {
          const again = await api(`/runs/${encodeURIComponent(id)}`).catch(() => null);
          if (again && again.summary) { stop(); draw().catch(remember); }
        }, 300);
      }
      main.dataset.ready = 'run';
      return;
    }
    const events = await api(`/runs/${encodeURIComponent(id)}/events`).catch(() => []);
    const failures = summary.steps.filter((s) => s.error).map((s) =>
      `<div class="rec" style="border-color:#d13c3c;background:#fff5f5"><div class="kind" style="color:#d13c3c">` +
      `${esc(s.id)} · ${esc(s.error.kind)}${s.error.code ? ' · ' + esc(s.error.code) : ''}</div>` +
      `<div>${esc(s.error.message)}</div></div>`).join('');
    const logs = summary.steps.filter((s) => s.log && s.log.length).map((s) =>
      `<details><summary>${esc(s.id)} (${s.log.length} lines${s.log_dropped_bytes ? `, ${s.log_dropped_bytes} bytes dropped` : ''})</summary>` +
      `<pre class="log">${esc(s.log.join('\n'))}</pre></details>`).join('');
    const eventRows = events.map((e) => `<tr><td class="num">${t0(events, e)}</td><td class="mono">${esc(e.type)}</td>` +
      `<td class="mono">${esc(eventDetail(e.data || {}))}</td></tr>`).join('');
    main.innerHTML = head + `
      <h2>Timeline</h2>
      <div class="card scroll">${gantt(summary, events)}</div>
      ${failures ? `<h2>Failures</h2>${failures}` : ''}
      ${logs ? `<h2>Logs</h2><div class="card">${logs}</div>` : ''}
      <h2>Events</h2>
      <div class="scroll"><table id="events"><tr><th>+ms</th><th>type</th><th>detail</th></tr>${eventRows}</table></div>`;
    main.dataset.ready = 'run';
  };
  await draw();
  return () => stop();
}

/** An event's time after the run's start, in ms. */
function t0(events, event) {
  const start = events.length ? Date.parse(events[0].time) : Date.parse(event.time);
  return (Date.parse(event.time) - start).toFixed(1);
}

pages.plugins = async (main) => {
  const [plugins, pools, history] = await Promise.all([
    api('/plugins'),
    api('/optimization/pools/stats'),
    api('/events/history?type=q.qflow.plugin.&limit=50'),
  ]);
  const poolOf = (name) => pools.wasm.byKey.filter((p) => p.key === name).map((p) => p.stats);
  const connectionRows = [['http', pools.http], ['db', pools.db]].flatMap(([kind, summary]) =>
    (summary ? summary.byKey : []).map((p) => `<tr><td>${kind}</td><td class="mono">${esc(p.key)}</td>
      <td class="num">${p.stats.in_use} / ${p.stats.total}</td><td class="num">${fmt.num(p.stats.creations)}</td>
      <td class="num">${fmt.num(p.stats.acquisitions)}</td><td class="num">${fmt.ms(p.stats.acquire_p99_us / 1000)}</td></tr>`)).join('');
  const rows = plugins.map((p) => {
    const stats = poolOf(p.name);
    const sum = (f) => stats.reduce((n, s) => n + f(s), 0);
    const p99 = stats.length ? Math.max(...stats.map((s) => s.acquire_p99_us)) / 1000 : null;
    return p.error
      ? `<tr data-plugin="${esc(p.name)}"><td><b>${esc(p.name)}</b></td><td colspan="8" class="error">${esc(p.error)}</td></tr>`
      : `<tr data-plugin="${esc(p.name)}"><td><b>${esc(p.name)}</b></td><td>${esc(p.version)}</td><td>${esc(p.kind)}</td>
         <td>${esc(p.contract || '–')}</td>
         <td class="mono" title="${esc(p.digest)}">${esc(p.digest.slice(0, 12))}</td><td>${esc(p.loaded_from)}</td>
         <td class="num">${stats.length ? `${sum((s) => s.in_use)} / ${sum((s) => s.total)}` : '–'}</td>
         <td class="num">${stats.length ? fmt.num(sum((s) => s.acquisitions)) : '–'}</td>
         <td class="num">${p99 == null ? '–' : fmt.ms(p99)}</td></tr>`;
  }).join('');
  const eventLine = (e) => `<tr><td>${esc(fmt.when(e.time))}</td><td class="mono">${esc(e.type.replace('q.qflow.plugin.', '').replace('.v1', ''))}</td>` +
    `<td>${esc(e.data.plugin)}</td><td>${esc(e.data.version || e.data.error || '')}</td></tr>`;
  main.innerHTML = `
    <h1>Plugins</h1>
    <div class="scroll"><table id="plugins-table"><tr><th>plugin</th><th>version</th><th>kind</th><th>contract</th><th>digest</th>
      <th>loaded from</th><th>instances (busy / alive)</th><th>acquisitions</th><th>acquisition p99</th></tr>${rows}</table></div>
    <h2>Connection pools</h2>
    <div class="scroll"><table id="connection-pools"><tr><th>kind</th><th>origin or database</th><th>connections (busy / alive)</th>
      <th>made</th><th>acquisitions</th><th>acquisition p99</th></tr>${connectionRows || '<tr><td colspan="6" class="muted">none yet: no step has used HTTP or a database</td></tr>'}</table></div>
    <h2>Reloads</h2>
    <div class="scroll"><table id="reloads"><tr><th>when</th><th>event</th><th>plugin</th><th>version or error</th></tr>
      ${history.slice().reverse().map(eventLine).join('') || '<tr><td colspan="4" class="muted">none yet</td></tr>'}</table></div>`;
  main.dataset.ready = 'plugins';
  return follow('?type=q.qflow.plugin.', (e) => {
    const table = $('#reloads');
    if (table) table.rows[0].insertAdjacentHTML('afterend', eventLine(e));
  });
};

// ── Router ──────────────────────────────────────────────────────────────

let leave = () => {};
async function route() {
  leave();
  leave = () => {};
  const [page, id] = location.hash.replace(/^#\/?/, '').split('/');
  const name = pages[page] ? page : 'overview';
  document.querySelectorAll('[data-nav]').forEach((a) => a.classList.toggle('active', a.dataset.nav === name));
  const main = $('#page');
  main.dataset.ready = '';
  try {
    leave = (await pages[name](main, id ? decodeURIComponent(id) : undefined)) || (() => {});
  } catch (e) {
    remember(e);
    main.innerHTML = `<p class="error">${esc(e.message)}</p>`;
    main.dataset.ready = 'error';
  }
}

document.addEventListener('click', (e) => {
  const row = e.target.closest('tr[data-href]');
  if (row) location.hash = row.dataset.href;
});
window.addEventListener('hashchange', route);
route();
