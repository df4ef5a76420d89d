// The demo page: send the chosen images to /classify/batch (the served model's answer), then to
// :explain (Grad-CAM), and show each result. Plain DOM, no libraries: nothing outside the cluster loads.
"use strict";

const MODEL = document.querySelector('meta[name="model-name"]').content;
const CHUNK = 8; // images per request: well under the server's per-request limit
const KEY_STORE = "cifar10.apiKey"; // sessionStorage: the key lives and dies with this tab

const $ = (selector, root = document) => root.querySelector(selector);
const results = $("#results");
const status = $("#status");
const keyInput = $("#api-key");

keyInput.value = sessionStorage.getItem(KEY_STORE) || "";
keyInput.addEventListener("input", () => sessionStorage.setItem(KEY_STORE, keyInput.value.trim()));

function authHeaders() {
  const key = keyInput.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function showStatus(message) {
  status.textContent = message;
  status.hidden = !message;
}

// The API's own error text: every failure is {"error": {"code", "message"}}.
async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON: a proxy's page */ }
  return `The server answered ${response.status} ${response.statusText}.`;
}

function percent(p) {
  return `${(100 * p).toFixed(1)} %`;
}

function newCard(file) {
  const card = $("#card").content.firstElementChild.cloneNode(true);
  const original = $(".original", card);
  original.src = URL.createObjectURL(file);
  original.alt = `Uploaded image ${file.name}`;
  original.addEventListener("error", () => { original.hidden = true; }, { once: true });
  $(".file", card).textContent = file.name || "pasted image";
  return card;
}

function showError(card, message) {
  card.dataset.state = "error";
  $(".label", card).textContent = "Not classified";
  const error = $(".error", card);
  error.textContent = message;
  error.hidden = false;
}

function showClassification(card, result) {
  card.dataset.state = "done";
  $(".label", card).textContent = result.predicted_class;
  $(".confidence", card).textContent = `${percent(result.confidence)} confident`;
  const list = $(".probabilities", card);
  list.replaceChildren();
  for (const [name, p] of Object.entries(result.all_probabilities)) {
    const row = document.createElement("li");
    row.classList.toggle("best", name === result.predicted_class);
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.style.width = percent(p).replace(" ", "");
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = percent(p);
    row.append(label, bar, value);
    list.append(row);
  }
  list.setAttribute("aria-label", `Probabilities of all ten classes for ${result.predicted_class}`);
  list.hidden = false;
}

function showExplanation(card, explanation, servedPrecision) {
  const overlay = $(".overlay", card);
  overlay.src = `data:image/png;base64,${explanation.overlay_png}`;
  overlay.alt = `Grad-CAM heat-map: where the network looked for "${explanation.target_class}"`;
  overlay.hidden = false;
  const note = $(".note", card);
  note.textContent = `Heat-map from the fp32 network on the same weights (served in ${servedPrecision}).`;
  note.hidden = false;
}

function showExplanationError(card, message) {
  const note = $(".note", card);
  note.textContent = `No heat-map: ${message}`;
  note.hidden = false;
}

function base64Of(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function classify(files, cards) {
  const form = new FormData();
  files.forEach((file) => form.append("files", file, file.name || "pasted.png"));
  const response = await fetch("/classify/batch", { method: "POST", body: form, headers: authHeaders() });
  if (!response.ok) {
    const message = await errorText(response);
    cards.forEach((card) => showError(card, message));
    showStatus(message);
    return [];
  }
  const body = await response.json();
  const classified = [];
  body.results.forEach((result, i) => {
    if (result.error) {
      showError(cards[i], result.error.message);
    } else {
      showClassification(cards[i], result);
      classified.push(i);
    }
  });
  return classified;
}

async function explain(files, cards) {
  const instances = await Promise.all(files.map(async (file) => ({ image: { b64: await base64Of(file) } })));
  const response = await fetch(`/v1/models/${encodeURIComponent(MODEL)}:explain`, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...authHeaders() },
    body: JSON.stringify({ instances }),
  });
  if (!response.ok) {
    const message = await errorText(response);
    cards.forEach((card) => showExplanationError(card, message));
    return;
  }
  const body = await response.json();
  body.explanations.forEach((explanation, i) => showExplanation(cards[i], explanation, body.served_precision));
}

async function handle(fileList) {
  const files = Array.from(fileList);
  if (!files.length) return;
  showStatus("");
  for (let start = 0; start < files.length; start += CHUNK) {
    const chunk = files.slice(start, start + CHUNK);
    const cards = chunk.map(newCard);
    results.prepend(...cards); // newest first, each batch in the order chosen
    try {
      const ok = await classify(chunk, cards);
      if (ok.length) await explain(ok.map((i) => chunk[i]), ok.map((i) => cards[i]));
    } catch (error) {
      const message = `Could not reach the server (${error.message}).`;
      cards.filter((card) => card.dataset.state === "pending").forEach((card) => showError(card, message));
      showStatus(message);
    }
  }
}

for (const input of [$("#files"), $("#camera")]) {
  input.addEventListener("change", () => { handle(input.files).finally(() => { input.value = ""; }); });
}

const drop = $("#drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  handle(event.dataTransfer.files);
});
document.addEventListener("paste", (event) => {
  if (event.target === keyInput) return; // pasting a key is not pasting an image
  if (event.clipboardData && event.clipboardData.files.length) handle(event.clipboardData.files);
});
$("#clear").addEventListener("click", () => { results.replaceChildren(); showStatus(""); });
$("#upload").addEventListener("submit", (event) => event.preventDefault());
