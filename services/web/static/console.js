// The console's one script: local times, confirmations, copy buttons, and live updates
// (Server-Sent Events carrying fragments the server rendered). Pages work without it.
"use strict";

const pad = (n) => String(n).padStart(2, "0");

function localTimes(root) {
  for (const t of root.querySelectorAll("time[datetime]")) {
    const at = new Date(t.getAttribute("datetime"));
    if (isNaN(at)) continue;
    t.textContent = `${at.getFullYear()}-${pad(at.getMonth() + 1)}-${pad(at.getDate())} ` +
      `${pad(at.getHours())}:${pad(at.getMinutes())}:${pad(at.getSeconds())}`;
  }
}

function fragment(html) {
  const template = document.createElement("template");
  template.innerHTML = html.trim();
  localTimes(template.content);
  return template.content;
}

// A message of a list stream: rows replaced where they are, new ones added on top (first
// page only), rows that left the page's filter taken off.
function applyRows(data) {
  const table = document.querySelector("table[data-list]");
  if (!table) return;
  const body = table.tBodies[0];
  const prepend = table.hasAttribute("data-prepend");
  for (const row of data.rows) {
    const old = body.querySelector(`tr[data-key="${CSS.escape(String(row.key))}"]`);
    if (row.remove) { if (old) old.remove(); continue; }
    const tr = fragment(row.html).firstElementChild;
    if (old) {
      if (old.outerHTML !== tr.outerHTML) { tr.classList.add("fresh"); old.replaceWith(tr); }
    } else if (prepend) {
      if (!data.snapshot) tr.classList.add("fresh");
      body.prepend(tr);
      // Newest first: a snapshot row older than rows already shown goes in its place.
      let next = tr.nextElementSibling;
      while (next && Number(next.dataset.key) > Number(row.key)) { next.after(tr); next = tr.nextElementSibling; }
    }
  }
  while (prepend && body.rows.length > 200) body.lastElementChild.remove();
  const empty = table.parentElement.querySelector(".empty");
  if (empty) empty.hidden = body.rows.length > 0;
}

function applyParts(data) {
  for (const [name, html] of Object.entries(data.parts)) {
    const part = document.querySelector(`[data-part="${name}"]`);
    if (part && part.innerHTML.trim() !== html.trim()) { part.replaceChildren(fragment(html)); }
  }
  document.body.dataset.status = data.status;
}

function live() {
  const url = document.body.dataset.live;
  if (!url || !window.EventSource) return;
  const state = document.getElementById("live-state");
  const show = (text, off) => { if (state) { state.hidden = false; state.textContent = text; state.classList.toggle("off", off); } };
  const source = new EventSource(url);
  source.addEventListener("open", () => show("live", false));
  source.addEventListener("error", () => show("reconnecting…", true));
  source.addEventListener("rows", (e) => { applyRows(JSON.parse(e.data)); document.body.dataset.liveReady = "1"; });
  source.addEventListener("parts", (e) => { applyParts(JSON.parse(e.data)); document.body.dataset.liveReady = "1"; });
  source.addEventListener("stop", (e) => {
    source.close();
    const why = JSON.parse(e.data);
    show("not live", true);
    if (state) state.title = `${why.code}: ${why.message}`;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  localTimes(document);
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (e) => { if (!confirm(form.dataset.confirm)) e.preventDefault(); });
  }
  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.addEventListener("click", () => {
      const input = document.getElementById(button.dataset.copy);
      input.select();
      navigator.clipboard?.writeText(input.value);
      button.textContent = "Copied";
    });
  }
  live();
});
