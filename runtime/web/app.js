// sdedge's page: a form over the server's own API (/v1/info, /v1/generate, /v1/img2img, /v1/inpaint,
// /v1/jobs/{id}/events, DELETE /v1/jobs/{id}). Every request goes to the server that served the page.
"use strict";

const $ = (id) => document.getElementById(id);
const FINAL = new Set(["done", "failed", "cancelled"]);
const MODES = { "/v1/generate": "txt2img", "/v1/img2img": "img2img", "/v1/inpaint": "inpaint" };
let info = null;
let token = sessionStorage.getItem("sdedge-token") || "";
let job = null; // {id, stream: AbortController} of the job this page runs

function authHeaders(extra = {}) {
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function setStatus(text) {
  $("status").textContent = text;
}

// The server's own message: a string, or FastAPI's list of {loc, msg}.
async function errorText(response) {
  let detail = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (typeof body.detail === "string") detail = body.detail;
    else if (Array.isArray(body.detail)) {
      detail = body.detail.map((d) => `${(d.loc || []).filter((x) => x !== "body").join(".") || "request"}: ${d.msg}`).join("\n");
    }
  } catch (_) { /* not JSON: keep the status line */ }
  return detail;
}

function newJobId() {
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return "page-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function loadInfo() {
  const response = await fetch("/v1/info", { cache: "no-store" });
  if (!response.ok) throw new Error(await errorText(response));
  info = await response.json();
  const d = info.defaults, l = info.limits;
  $("steps").value = d.steps; $("steps").max = l.max_steps;
  $("guidance").value = d.guidance;
  for (const [id, range] of [["width", l.width], ["height", l.height]]) {
    $(id).value = d[id]; $(id).min = range[0]; $(id).max = range[1]; $(id).step = l.multiple;
  }
  $("scheduler").replaceChildren(...info.schedulers.map((name) => new Option(name, name, false, name === d.scheduler)));
  $("prompt").maxLength = l.max_prompt_chars;
  $("init").hidden = !(info.abilities.img2img || info.abilities.inpaint);
  $("mask-row").hidden = !info.abilities.inpaint;
  $("auth").hidden = !info.auth || Boolean(token);
  if (!info.abilities.txt2img) {  // an inpainting bundle (9-channel UNet): an image and a mask are needed
    $("init").querySelector("legend").textContent = "Image and mask (this bundle inpaints)";
    setStatus("give an image and a mask: this is an inpainting bundle");
  }
  const kinds = Object.entries(info.abilities).filter(([, ok]) => ok).map(([k]) => k).join(", ");
  $("server").textContent = `${kinds} · sizes ${l.width.join("–")} × ${l.height.join("–")} (multiples of ${l.multiple})` +
    (info.auth ? " · token required" : "");
}

function fileBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).replace(/^data:[^,]*,/, ""));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// A number field: its number, or its raw text so that the server names what is wrong with it.
function numberField(id, parse) {
  const text = $(id).value.trim();
  if (text === "") return undefined;
  const value = parse(text);
  return Number.isFinite(value) ? value : text;
}

async function requestBody() {
  const body = { prompt: $("prompt").value, negative_prompt: $("negative").value, scheduler: $("scheduler").value };
  for (const [id, parse] of [["steps", Number], ["guidance", Number], ["seed", Number], ["width", Number], ["height", Number]]) {
    const value = numberField(id, parse);
    if (value !== undefined) body[id] = value;
  }
  let route = "/v1/generate";
  const image = $("image").files[0], mask = $("mask").files[0];
  if (image) {
    body.image = await fileBase64(image);
    body.strength = Number($("strength").value);
    route = "/v1/img2img";
    if (mask) { body.mask = await fileBase64(mask); route = "/v1/inpaint"; }
  } else if (mask) {
    throw new Error("mask: give the image to inpaint too");
  }
  return { route, body };
}

function showProgress(status) {
  const bar = $("progress");
  if (status.state === "queued") setStatus("waiting in the queue…");
  else if (status.state === "running") {
    bar.max = Math.max(1, status.steps_total);
    bar.value = status.steps_done;
    setStatus(`step ${status.steps_done}/${status.steps_total}`);
  }
}

// Server-sent events read with fetch (EventSource cannot send the token).
async function follow(id, controller) {
  try {
    const response = await fetch(`/v1/jobs/${id}/events`, { headers: authHeaders(), signal: controller.signal });
    if (!response.ok) return;
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\n").filter((line) => line.startsWith("data: ")).map((line) => line.slice(6)).join("\n");
        if (data) {
          const status = JSON.parse(data);
          if (job && job.id === id && !FINAL.has(status.state)) showProgress(status);
        }
      }
    }
  } catch (_) { /* aborted when the job ends */ }
}

function showResult(blob, response, route, body) {
  const url = URL.createObjectURL(blob);
  const old = $("output").src;
  $("output").src = url;
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
  const seed = response.headers.get("X-Seed");
  const rows = [
    ["prompt", body.prompt], ["negative prompt", body.negative_prompt || "—"], ["mode", MODES[route]],
    ["size", `${body.width ?? info.defaults.width} × ${body.height ?? info.defaults.height}`],
    ["steps", body.steps ?? info.defaults.steps], ["guidance", body.guidance ?? info.defaults.guidance],
    ["scheduler", body.scheduler], ["seed", seed], ...(body.strength ? [["strength", body.strength]] : []),
    ["seconds", response.headers.get("X-Generation-Seconds")], ["job", response.headers.get("X-Job-Id")],
  ];
  $("settings").replaceChildren(...rows.flatMap(([k, v]) => {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k; dd.textContent = String(v);
    return [dt, dd];
  }));
  $("download").href = url;
  $("download").download = `sdedge-${seed}.png`;
  $("result").hidden = false;
}

function setRunning(running) {
  $("generate").disabled = running;
  $("cancel").disabled = !running;
}

async function generate(event) {
  event.preventDefault();
  showError("");
  let request;
  try { request = await requestBody(); } catch (error) { showError(error.message); return; }
  const id = newJobId();
  job = { id, stream: new AbortController() };
  document.body.dataset.job = id;
  setRunning(true);
  $("progress").value = 0;
  setStatus("sending…");
  follow(id, job.stream);
  try {
    const response = await fetch(request.route, {
      method: "POST", body: JSON.stringify(request.body),
      headers: authHeaders({ "Content-Type": "application/json", Accept: "image/png", "X-Job-Id": id }),
    });
    if (response.ok) {
      showResult(await response.blob(), response, request.route, request.body);
      $("progress").value = $("progress").max;
      setStatus("done");
    } else {
      const text = await errorText(response);
      if (response.status === 401) { $("auth").hidden = false; $("token").focus(); }
      if (/cancelled/.test(text) && response.status === 503) setStatus("cancelled");
      else { setStatus(`failed (${response.status})`); showError(text); }
    }
  } catch (error) {
    setStatus("failed");
    showError(`the server did not answer (${error.message})`);
  } finally {
    job.stream.abort();
    job = null;
    setRunning(false);
  }
}

async function cancel() {
  if (!job) return;
  const id = job.id;
  $("cancel").disabled = true;
  setStatus("cancelling…");
  const response = await fetch(`/v1/jobs/${id}`, { method: "DELETE", headers: authHeaders() });
  if (!response.ok && response.status !== 409) showError(await errorText(response));
}

function useToken(event) {
  event.preventDefault();
  token = $("token").value.trim();
  sessionStorage.setItem("sdedge-token", token);
  $("auth").hidden = true;
  showError("");
}

window.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("auth").addEventListener("submit", useToken);
  $("strength").addEventListener("input", () => { $("strength-value").textContent = $("strength").value; });
  loadInfo().catch((error) => showError(`could not read /v1/info: ${error.message}`));
});
