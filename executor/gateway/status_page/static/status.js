// The status page: render each snapshot from /status/events (Server-Sent Events).
// Executor ids and model names come from anyone on the bus: they only ever go into
// the page as text (textContent), never as HTML.
"use strict";

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function fmt(value, unit, digits) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits) + unit;
}

function price(input, output) {
  return `$${Number(input)} / $${Number(output)}`;
}

function health(executor) {
  const rates = executor.offers.map((o) => o.success_rate).filter((r) => r !== null && r !== undefined);
  const worst = rates.length ? Math.min(...rates) : null;
  if (executor.state !== "up") return ["down", "bad"];
  if (executor.offers.length && !executor.offers.some((o) => o.available)) return ["unavailable", "bad"];
  if (worst !== null && worst < 0.9) return ["degraded", "warn"];
  if (executor.capacity && executor.in_flight >= executor.capacity) return ["full", "warn"];
  return ["healthy", "ok"];
}

function loadCell(executor) {
  const td = el("td", null, "num");
  const bar = el("span", null, "bar");
  const fill = el("i");
  const share = executor.capacity ? Math.min(1, executor.in_flight / executor.capacity) : 0;
  fill.style.width = `${Math.round(share * 100)}%`;
  if (share >= 0.8) bar.classList.add("busy");
  bar.appendChild(fill);
  td.appendChild(bar);
  td.appendChild(document.createTextNode(`${executor.in_flight} / ${executor.capacity}`));
  return td;
}

function renderModels(models) {
  const body = document.querySelector("#models tbody");
  body.replaceChildren(...models.map((m) => {
    const tr = el("tr");
    tr.dataset.model = m.name;
    tr.append(el("td", m.name, "model-name"), el("td", `${m.available} of ${m.executors}`, "num"),
      el("td", price(m.cheapest_input, m.cheapest_output), "num"),
      el("td", fmt(m.best_tokens_per_s, " tok/s", 1), "num"), el("td", fmt(m.best_latency_ms, " ms", 0), "num"));
    return tr;
  }));
  document.getElementById("models-empty").hidden = models.length > 0;
}

function renderExecutors(executors) {
  const rows = [];
  for (const x of executors) {
    const offers = x.offers.length ? x.offers : [null];
    const [word, cls] = health(x);
    offers.forEach((o, i) => {
      const tr = el("tr", null, i === 0 ? "first" : "");
      tr.dataset.executor = x.id;
      if (i === 0) {
        const id = el("td", x.id, "executor-id");
        id.title = x.key;
        const state = el("td");
        state.appendChild(el("span", word, `badge ${cls}`));
        const load = loadCell(x);
        for (const td of [id, state, load]) td.rowSpan = offers.length;
        tr.append(id, state, load);
      }
      if (o === null) {
        tr.append(el("td", "no models", "muted"));
      } else {
        tr.append(el("td", o.model, "model-name"), el("td", price(o.input_price, o.output_price), "num"),
          el("td", fmt(o.tokens_per_s, " tok/s", 1), "num"), el("td", fmt(o.latency_ms, " ms", 0), "num"),
          el("td", fmt(o.ttft_ms, " ms", 0), "num"),
          el("td", o.success_rate === null || o.success_rate === undefined ? "–" : `${Math.round(o.success_rate * 100)}%`, "num"));
      }
      rows.push(tr);
    });
  }
  document.querySelector("#executors tbody").replaceChildren(...rows);
  document.getElementById("executors-empty").hidden = executors.length > 0;
}

function render(snapshot) {
  const running = snapshot.executors.reduce((n, x) => n + x.in_flight, 0);
  const capacity = snapshot.executors.reduce((n, x) => n + x.capacity, 0);
  document.getElementById("n-executors").textContent = String(snapshot.executors.length);
  document.getElementById("n-models").textContent = String(snapshot.models.length);
  document.getElementById("load").textContent = `${running} / ${capacity}`;
  renderModels(snapshot.models);
  renderExecutors(snapshot.executors);
}

function connect() {
  const conn = document.getElementById("conn");
  const source = new EventSource("/status/events");
  source.addEventListener("snapshot", (event) => {
    render(JSON.parse(event.data));
    conn.dataset.state = "live";
    conn.textContent = `live · updated ${new Date().toLocaleTimeString()}`;
  });
  source.onerror = () => {
    // EventSource reconnects by itself; say so meanwhile.
    conn.dataset.state = "lost";
    conn.textContent = "connection lost, reconnecting…";
  };
}

document.addEventListener("DOMContentLoaded", connect);
