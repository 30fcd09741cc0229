// The console's one script: local times, confirmations, copy buttons, and live updates
// (Server-Sent Events carrying fragments the server rendered). Pages work without it.
"use strict";

document.documentElement.classList.add("js");

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
      if (old.outerHTML !== tr.outerHTML) { tr.classList.add("fresh"); keepingFocus(old, () => old.replaceWith(tr), tr); }
    } else if (prepend) {
      if (!data.snapshot) tr.classList.add("fresh");
      body.prepend(tr);
      // Newest first: a snapshot row older than rows already shown goes in its place.
      let next = tr.nextElementSibling;
      while (next && Number(next.dataset.key) > Number(row.key)) { next.after(tr); next = tr.nextElementSibling; }
    }
  }
  while (prepend && body.rows.length > 200) body.lastElementChild.remove();
  const box = table.closest(".scroll") || table;
  const empty = box.parentElement.querySelector(".empty");
  if (empty) {
    empty.hidden = body.rows.length > 0;
    // Rows that left the filter live do not mean nothing matches: later rows (the next page)
    // may. Say so instead of "No enforcements match".
    if (!empty.hidden && !data.snapshot && empty.dataset.emptied) empty.textContent = empty.dataset.emptied;
  }
}

function applyParts(data) {
  for (const [name, html] of Object.entries(data.parts)) {
    const part = document.querySelector(`[data-part="${name}"]`);
    if (!part || part.innerHTML.trim() === html.trim()) continue;
    // Ticked boxes stay ticked across a live update (an operator selecting rows to retry).
    const ticked = new Set([...part.querySelectorAll("input[type=checkbox]:checked")].map((b) => `${b.name}=${b.value}`));
    const fresh = fragment(html);
    for (const box of fresh.querySelectorAll("input[type=checkbox]")) box.checked = ticked.has(`${box.name}=${box.value}`);
    for (const form of fresh.querySelectorAll("form[data-confirm]")) confirming(form);
    keepingFocus(part, () => part.replaceChildren(fresh), part);
  }
  if (data.status) document.body.dataset.status = data.status;
}

// The element a live update replaced, found again in what replaced it: the same tag and
// identifying attributes (a row's link, a Retry button, a ticked box).
function twin(el) {
  const attrs = ["id", "name", "value", "href", "data-retry"].filter((a) => el.hasAttribute(a));
  return el.localName + attrs.map((a) => `[${a}="${CSS.escape(el.getAttribute(a))}"]`).join("");
}

// A live update never moves the keyboard's place: when it replaces the focused element, focus
// goes to its twin (without it, focus falls back to the page's start, and the next Tab with it).
function keepingFocus(old, replace, root) {
  const focused = document.activeElement;
  const inside = focused && focused !== document.body && old.contains(focused);
  const selector = inside ? twin(focused) : null;
  replace();
  if (selector && !root.contains(focused)) root.querySelector(selector)?.focus({ preventScroll: true });
}

function confirming(form) {
  form.addEventListener("submit", (e) => { if (!confirm(form.dataset.confirm)) e.preventDefault(); });
}

// Enter in a field runs the button its part names (data-enter: the tester's Test, the form's
// save), not the form's first button in document order (the rule form's More rows).
function enterRuns(box) {
  box.addEventListener("keydown", (e) => {
    if (e.key !== "Enter" || e.isComposing || e.target.localName !== "input") return;
    const button = document.getElementById(box.dataset.enter);
    if (!button || !button.form) return;
    e.preventDefault();
    button.form.requestSubmit(button);
  });
}

function menu() {
  const button = document.getElementById("menu");
  const nav = document.getElementById("nav");
  if (!button || !nav) return;
  button.hidden = false;
  const set = (open) => { nav.classList.toggle("open", open); button.setAttribute("aria-expanded", String(open)); };
  button.addEventListener("click", () => set(!nav.classList.contains("open")));
  // Tabbing out of the open menu folds it: focus landing anywhere on the page but the button
  // and the navigation. (Focus leaving the page, to another window, keeps it as it is.)
  document.addEventListener("focusin", (e) => {
    if (nav.classList.contains("open") && e.target !== button && !nav.contains(e.target)) set(false);
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && nav.classList.contains("open")) { set(false); button.focus(); }
  });
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
  for (const form of document.querySelectorAll("form[data-confirm]")) confirming(form);
  menu();
  for (const box of document.querySelectorAll("[data-enter]")) enterRuns(box);
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
