// The sundae web app's page: forms built from the server's field tables (/api/info), a canvas
// mask brush, and job streams read as JSON lines (one event per line) from POST responses.
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = { info: null, editor: null };

// --- forms built from the server's field tables -------------------------------------------------

function makeInput(field, classNames) {
  if (field.type === "boolean") {
    const input = document.createElement("input");
    input.type = "checkbox";
    input.checked = field.default;
    return input;
  }
  if (field.type === "choice" || field.type === "class") {
    const select = document.createElement("select");
    const options = field.type === "choice"
      ? field.choices.map((choice) => [choice, choice])
      : [["", "(none: null class)"], ...classNames.map((name, index) => [String(index), name])];
    for (const [value, text] of options) select.add(new Option(text, value, false, value === field.default));
    return select;
  }
  const input = document.createElement("input");
  input.type = "number";
  input.step = String(field.step);
  input.min = String(field.minimum);
  input.max = String(field.maximum);
  if (field.default !== null) input.value = String(field.default);
  if (field.nullable) input.placeholder = field.placeholder;
  return input;
}

// Rebuilds a form's inputs, keeping the values the user already typed into same-named fields.
function buildFields(container, fields) {
  const previous = new Map([...container.querySelectorAll("[name]")].map((input) => [input.name, input]));
  const classNames = state.info.model.class_names;
  container.replaceChildren();
  for (const field of fields) {
    if (field.type === "image" || (field.type === "class" && classNames === null)) continue;
    const input = makeInput(field, classNames || []);
    input.name = field.name;
    input.dataset.type = field.type;
    const old = previous.get(field.name);
    if (old && old.dataset.type === field.type) {
      if (field.type === "boolean") input.checked = old.checked; else input.value = old.value;
    }
    const label = document.createElement("label");
    label.className = field.type === "boolean" ? "check" : "";
    if (field.type === "boolean") label.append(input, " ", field.label);
    else label.append(field.label, input);
    container.append(label);
  }
}

// Sends what the user typed; the server validates and names any field it refuses.
function readFields(container) {
  const values = {};
  for (const input of container.querySelectorAll("[name]")) {
    const type = input.dataset.type;
    if (type === "boolean") values[input.name] = input.checked;
    else if (type === "choice") values[input.name] = input.value;
    else if (type === "class") values[input.name] = input.value === "" ? null : Number(input.value);
    else if (input.value === "" && input.placeholder) values[input.name] = null;
    else values[input.name] = input.value === "" ? null : Number(input.value);
  }
  return values;
}

// --- job streams ------------------------------------------------------------------------------

async function streamJob(path, payload, onEvent, signal) {
  const body = JSON.stringify({ ...payload, model: state.info.model.name });
  const limit = state.info.limits.max_body_bytes;
  if (body.length > limit) {  // refused here, since a browser may not read the server's early 413
    throw new Error(`the request is ${(body.length / 2 ** 20).toFixed(1)} MB, over the server's `
      + `${(limit / 2 ** 20).toFixed(0)} MB limit; use a smaller image`);
  }
  const response = await fetch(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body, signal,
  });
  if (!response.ok) {
    const problem = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
    throw new Error(problem.error);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline);
      buffer = buffer.slice(newline + 1);
      if (line) onEvent(JSON.parse(line));
    }
  }
}

// Runs one job for a panel: buttons, status line, Stop (aborting the fetch cancels the job server-side).
async function runPanel(panel, path, payload, onEvent) {
  const run = $(`#${panel}-button`), stop = $(`#${panel}-stop`), status = $(`#${panel}-status`);
  const controller = new AbortController();
  const started = performance.now();
  run.disabled = true;
  stop.disabled = false;
  stop.onclick = () => controller.abort();
  status.className = "status";
  status.textContent = "sending…";
  try {
    await streamJob(path, payload, (event) => {
      if (event.event === "queued") {
        status.textContent = event.ahead ? `queued behind ${event.ahead} job(s)…` : "starting…";
      }
      else if (event.event === "started") status.textContent = "sampling…";
      else if (event.event === "preview") status.textContent = `sampling… step ${event.step}`;
      else if (event.event === "cancelled") status.textContent = "stopped";
      else if (event.event === "error") showError(status, event.message);
      else if (event.event === "done") {
        const total = ((performance.now() - started) / 1000).toFixed(2);
        status.textContent = `done: ${event.images.length} image(s) in ${event.seconds.toFixed(2)} s of sampling `
          + `(${total} s in all); steps taken ${event.steps_taken.join(", ")}`
          + (event.files.length ? `; saved as ${event.files[0]}…` : "");
      }
      onEvent(event);
    }, controller.signal);
  } catch (error) {
    if (error.name === "AbortError") status.textContent = "stopped";
    else showError(status, error.message);
  } finally {
    run.disabled = false;
    stop.disabled = true;
  }
}

function showError(status, message) {
  status.className = "status error";
  status.textContent = `error: ${message}`;
}

// --- galleries ----------------------------------------------------------------------------------

function showImages(gallery, images, captions, name) {
  if (gallery.children.length !== images.length) {
    gallery.replaceChildren(...images.map(() => {
      const figure = document.createElement("figure");
      figure.append(document.createElement("img"), document.createElement("figcaption"));
      return figure;
    }));
  }
  images.forEach((url, index) => {
    const figure = gallery.children[index];
    figure.querySelector("img").src = url;
    figure.querySelector("figcaption").textContent = captions[index];
    figure.querySelector(".result-actions")?.remove();
    if (name === null) return;
    const actions = document.createElement("div");
    actions.className = "result-actions";
    const use = document.createElement("button");
    use.type = "button";
    use.className = "use";
    use.textContent = "Edit";
    use.onclick = () => setSource(url);
    const download = document.createElement("a");
    download.href = url;
    download.download = `${name}-${index}.png`;
    download.textContent = "Download PNG";
    actions.append(use, download);
    figure.append(actions);
  });
}

function finalCaptions(event) {
  return event.seeds.map((seed, index) => `seed ${seed} · stopped at step ${event.steps_taken[index]}`);
}

// --- generate -----------------------------------------------------------------------------------

$("#generate-form").addEventListener("submit", (submitted) => {
  submitted.preventDefault();
  const gallery = $("#generate-results");
  runPanel("generate", "/api/generate", readFields($("#generate-fields")), (event) => {
    if (event.event === "preview") {
      showImages(gallery, event.images,
        event.finished.map((done) => (done ? "stopped" : `step ${event.step}`)), null);
    } else if (event.event === "done") {
      showImages(gallery, event.images, finalCaptions(event), `sundae-${event.job}`);
    }
  });
});

// --- the editor: source image and mask brush ------------------------------------------------------

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the browser cannot read this image"));
    image.src = url;
  });
}

// App results, and uploads the server takes (the CLI's rule: sides multiples of f, within the canvas limit), are
// used as they are; any other upload is centre-cropped and resized to the model's size, and the status says so.
async function setSource(url, uploadName = null) {
  const image = await loadImage(url);
  const { factor, image_size: [modelHeight, modelWidth] } = state.info.model;
  const [maxHeight, maxWidth] = state.info.limits.max_canvas;
  const [uploadWidth, uploadHeight] = [image.naturalWidth, image.naturalHeight];
  const editable = uploadWidth % factor === 0 && uploadHeight % factor === 0
    && uploadWidth <= maxWidth && uploadHeight <= maxHeight;
  const fitToModel = uploadName !== null && !editable;
  const width = fitToModel ? modelWidth : uploadWidth;
  const height = fitToModel ? modelHeight : uploadHeight;
  const canvas = $("#image-canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = true;
  if (fitToModel) {
    const scale = Math.max(width / image.naturalWidth, height / image.naturalHeight);
    const cropWidth = width / scale, cropHeight = height / scale;
    context.drawImage(image, (image.naturalWidth - cropWidth) / 2, (image.naturalHeight - cropHeight) / 2,
      cropWidth, cropHeight, 0, 0, width, height);
  } else {
    context.drawImage(image, 0, 0);
  }
  const mask = $("#mask-canvas");
  mask.width = width;
  mask.height = height;
  state.editor = { width, height, source: canvas.toDataURL("image/png"), mask: new Uint8Array(width * height) };
  const displayScale = Math.max(1, Math.floor(384 / Math.max(width, height)));
  $("#canvas-stack").style.setProperty("--display-width", `${Math.min(512, width * displayScale)}px`);
  $("#canvas-stack").style.setProperty("--aspect", `${width} / ${height}`);
  const brush = $("#brush-size");
  brush.max = String(Math.max(2, Math.round(Math.max(width, height) / 3)));
  brush.value = String(Math.max(1, Math.round(Math.max(width, height) / 8)));
  $("#brush-size-value").textContent = brush.value;
  drawMask();
  if (uploadName === null) return;
  const status = $("#edit-status");  // a new image: the last run's status no longer applies
  status.className = fitToModel ? "status notice" : "status";
  status.textContent = fitToModel
    ? `${uploadName} is ${uploadWidth}×${uploadHeight} px, which this model cannot edit as it is (both sides must `
      + `be multiples of f=${factor} and at most ${maxWidth}×${maxHeight}): centre-cropped and resized to `
      + `${modelWidth}×${modelHeight} px`
    : `loaded ${uploadName} (${width}×${height} px)`;
}

function blankSource() {
  const [height, width] = state.info.model.image_size;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  context.fillStyle = "#808080";
  context.fillRect(0, 0, width, height);
  return canvas.toDataURL("image/png");
}

function drawMask() {
  const { width, height, mask } = state.editor;
  const pixels = new ImageData(width, height);
  mask.forEach((masked, index) => {
    if (masked) pixels.data.set([255, 40, 90, 150], index * 4);
  });
  $("#mask-canvas").getContext("2d").putImageData(pixels, 0, 0);
}

// Sets every pixel whose centre lies within the brush disc; crisp, so the overlay is exactly the mask.
function stamp(x, y, value) {
  const { width, height, mask } = state.editor;
  const radius = Number($("#brush-size").value) / 2;
  for (let row = Math.max(0, Math.floor(y - radius)); row < Math.min(height, Math.ceil(y + radius)); row++) {
    for (let column = Math.max(0, Math.floor(x - radius)); column < Math.min(width, Math.ceil(x + radius)); column++) {
      if ((column + 0.5 - x) ** 2 + (row + 0.5 - y) ** 2 <= radius * radius) mask[row * width + column] = value;
    }
  }
}

function stroke(from, to, value) {
  const spacing = Math.max(0.5, Number($("#brush-size").value) / 4);
  const count = Math.max(1, Math.ceil(Math.hypot(to.x - from.x, to.y - from.y) / spacing));
  for (let index = 0; index <= count; index++) {
    stamp(from.x + ((to.x - from.x) * index) / count, from.y + ((to.y - from.y) * index) / count, value);
  }
  drawMask();
}

function canvasPoint(event) {
  const canvas = $("#mask-canvas");
  const rect = canvas.getBoundingClientRect();
  return { x: ((event.clientX - rect.left) * canvas.width) / rect.width,
           y: ((event.clientY - rect.top) * canvas.height) / rect.height };
}

function setUpBrush() {
  const canvas = $("#mask-canvas");
  let last = null;
  const value = () => (document.querySelector("input[name=tool]:checked").value === "paint" ? 1 : 0);
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    last = canvasPoint(event);
    stroke(last, last, value());
  });
  canvas.addEventListener("pointermove", (event) => {
    if (last === null) return;
    const point = canvasPoint(event);
    stroke(last, point, value());
    last = point;
  });
  const end = () => { last = null; };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  $("#brush-size").addEventListener("input", () => { $("#brush-size-value").textContent = $("#brush-size").value; });
  $("#mask-clear").onclick = () => { state.editor.mask.fill(0); drawMask(); };
  $("#mask-invert").onclick = () => { state.editor.mask.forEach((m, i, mask) => { mask[i] = 1 - m; }); drawMask(); };
  $("#upload").addEventListener("change", () => {
    const file = $("#upload").files[0];
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => setSource(reader.result, file.name)
      .catch((error) => showError($("#edit-status"), error.message));
    reader.readAsDataURL(file);
  });
}

// White where the user painted: the mask the server expects, at the image's size.
function maskDataUrl() {
  const { width, height, mask } = state.editor;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const pixels = new ImageData(width, height);
  mask.forEach((masked, index) => {
    const grey = masked ? 255 : 0;
    pixels.data.set([grey, grey, grey, 255], index * 4);
  });
  canvas.getContext("2d").putImageData(pixels, 0, 0);
  return canvas.toDataURL("image/png");
}

// An example of the model's directory: its image in the editor, its mask painted, its class chosen.
async function loadExample(example) {
  $("#edit-mode").value = "inpaint";
  buildEditFields();
  await setSource(example.image);
  const { width, height } = state.editor;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  context.drawImage(await loadImage(example.mask), 0, 0);
  const data = context.getImageData(0, 0, width, height).data;
  state.editor.mask = Uint8Array.from({ length: width * height }, (_, index) => (data[index * 4] >= 128 ? 1 : 0));
  drawMask();
  const classField = $("#edit-fields [name=class_label]");
  const classIndex = (state.info.model.class_names || []).indexOf(example.class_label);
  if (classField && classIndex >= 0) classField.value = String(classIndex);
  $("#edit-status").className = "status";
  $("#edit-status").textContent = `example: ${example.name}; press Run for fills of the painted region`;
}

// --- edit ---------------------------------------------------------------------------------------

function buildEditFields() {
  buildFields($("#edit-fields"), state.info.operations[$("#edit-mode").value]);
}

$("#edit-form").addEventListener("submit", (submitted) => {
  submitted.preventDefault();
  const mode = $("#edit-mode").value;
  const payload = { ...readFields($("#edit-fields")), image: state.editor.source };
  if (mode !== "outpaint") payload.mask = maskDataUrl();
  runPanel("edit", `/api/${mode}`, payload, (event) => {
    if (event.event !== "done") return;
    showImages($("#edit-results"), event.images, finalCaptions(event), `sundae-${event.job}`);
  });
});

// --- start --------------------------------------------------------------------------------------

// Loads a model's facts and forms (name null: the server's first model); the page's forms, canvas and
// results all follow the model, so switching rebuilds them and clears the galleries.
async function loadModel(name) {
  document.body.dataset.ready = "false";
  const response = await fetch(name === null ? "/api/info" : `/api/info?model=${encodeURIComponent(name)}`);
  const info = await response.json();
  if (!response.ok) throw new Error(info.error);
  state.info = info;
  const model = info.model;
  const [height, width] = model.image_size;
  const select = $("#model-select");
  select.replaceChildren(...info.models.map((option) => new Option(option, option, false, option === model.name)));
  $("#model-info").textContent = `${model.paradigm} · tokenizer ${model.tokenizer} (f=${model.factor}, `
    + `codebook ${model.codebook_size}) · ${width}×${height} px · `
    + `${model.class_names ? `${model.class_names.length} classes` : "unconditional"} · ${model.device}`;
  buildFields($("#generate-fields"), info.operations.generate);
  // a VAR model has no refine: offer only the edit modes this model has
  const mode = $("#edit-mode");
  for (const option of mode.options) option.hidden = !(option.value in info.operations);
  if (!(mode.value in info.operations)) mode.value = "inpaint";
  buildEditFields();
  $("#examples").hidden = info.examples.length === 0;
  $("#example-select").replaceChildren(new Option("choose…", ""),
    ...info.examples.map((example, index) => new Option(example.name, String(index))));
  for (const gallery of ["#generate-results", "#edit-results"]) $(gallery).replaceChildren();
  await setSource(blankSource());
  document.body.dataset.ready = "true";
}

async function start() {
  $("#edit-mode").addEventListener("change", buildEditFields);
  $("#example-select").addEventListener("change", () => {
    const chosen = $("#example-select").value;
    if (chosen !== "") {
      loadExample(state.info.examples[Number(chosen)]).catch((error) => showError($("#edit-status"), error.message));
    }
  });
  setUpBrush();
  const select = $("#model-select");
  select.addEventListener("change", async () => {
    select.disabled = true;
    try {
      await loadModel(select.value);
    } catch (error) {
      showError($("#generate-status"), `cannot load model ${select.value} (${error.message})`);
      select.value = state.info.model.name;
      document.body.dataset.ready = "true";
    } finally {
      select.disabled = false;
    }
  });
  await loadModel(null);
}

start().catch((error) => showError($("#generate-status"), `cannot reach the server (${error.message})`));
