// The explore page: reads the embedded data, keeps the view's state (mirrored in the URL fragment,
// so that a link reopens the same view), draws the chosen view on the picture and on one panel per
// feature level, and publishes what it drew as window.explore.drawn (a copy) for tests and scripts.
//
// Geometry: the model's coordinates are normalised to its padded input (the "frame"); the page
// draws in the original image's pixels, the frame scaled by the resize. Predicted boxes are
// normalised to the image itself. Text from the data (class and file names) is only ever set as
// text: textContent, option labels and canvas fillText.
"use strict";
(() => {
  const meta = JSON.parse(document.getElementById("explore-meta").textContent);
  const buffer = decodeBase64(document.getElementById("explore-data").textContent).buffer;
  const TYPES = { Uint8Array, Uint16Array };
  const DOT_RADIUS = 24;  // CSS pixels of a dot of weight 1 at dot size 1: area proportional to weight
  const PANEL_WIDTH = 250;
  const HEAT_STOPS = [[0, 0, 4], [81, 18, 124], [183, 55, 121], [252, 137, 97], [252, 253, 191]];
  const $ = (id) => document.getElementById(id);
  const pictures = meta.images.map(() => null);  // decoded lazily, one per image
  let drawn = null;
  let hovered = null;  // {query, level}: the encoder query under the mouse, or the heat map cell

  function decodeBase64(text) {
    const binary = atob(text);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
  }

  function array(image, name) {
    const spec = image.arrays[name];
    return new TYPES[spec.type](buffer, spec.offset, spec.length);
  }

  const decode = (scale, code) => scale.low + code * scale.step;
  const coordinate = (code) => decode(meta.scales.coordinate, code);
  const weight = (code) => decode(meta.scales.weight, code);
  const score = (code) => decode(meta.scales.score, code);
  const className = (label) => meta.classNames[label] ?? `class ${label}`;
  const range = (count) => Array.from({ length: count }, (_, i) => i);

  // ---- state, and the URL fragment that mirrors it ----

  const lastEncoderLayer = meta.encoderLayers[meta.encoderLayers.length - 1];
  const state = {
    view: "encoder", image: 0, encoderLayer: lastEncoderLayer, queryLevel: 0,
    heads: range(meta.heads).map(() => true), levels: range(meta.levels).map(() => true),
    opacity: 0.85, dotSize: 1, pins: [], query: -1, decoderLayer: meta.decoderLayerCount,
    threshold: meta.scoreThreshold, proposals: false, proposalCount: 10,
  };

  function readFragment() {
    const fragment = new URLSearchParams(location.hash.slice(1));
    const number = (key, low, high, integer = true) => {
      const value = Number(fragment.get(key));
      const valid = fragment.has(key) && Number.isFinite(value) && value >= low && value <= high;
      return valid && (!integer || Number.isInteger(value)) ? value : undefined;
    };
    const flags = (key, count) => {
      const text = fragment.get(key);
      return text && /^[01]+$/.test(text) && text.length === count ? [...text].map((c) => c === "1") : undefined;
    };
    const set = (key, value) => { if (value !== undefined) state[key] = value; };
    if (["encoder", "decoder", "heat"].includes(fragment.get("view"))) state.view = fragment.get("view");
    set("image", number("image", 0, meta.images.length - 1));
    const image = meta.images[state.image];
    const layer = number("elayer", 1, meta.encoderLayerCount);
    if (layer !== undefined && meta.encoderLayers.includes(layer - 1)) state.encoderLayer = layer - 1;
    set("queryLevel", number("qlevel", 0, meta.levels - 1));
    set("heads", flags("heads", meta.heads));
    set("levels", flags("levels", meta.levels));
    set("opacity", number("opacity", 0.1, 1, false));
    set("dotSize", number("dot", 0.25, 4, false));
    const pins = (fragment.get("pins") || "").split(",").filter((text) => text !== "").map(Number);
    state.pins = pins.filter((query) => isKept(image, query)).slice(0, 2);
    set("query", number("query", -1, image.queries - 1));
    set("decoderLayer", number("dlayer", 1, meta.decoderLayerCount));
    set("threshold", number("threshold", 0, 1, false));
    state.proposals = meta.twoStage && fragment.get("proposals") === "1";
    set("proposalCount", number("top", 1, image.queries));
  }

  function writeFragment() {
    const bits = (flags) => flags.map((on) => (on ? "1" : "0")).join("");
    const fragment = new URLSearchParams({
      view: state.view, image: state.image, elayer: state.encoderLayer + 1, qlevel: state.queryLevel,
      heads: bits(state.heads), levels: bits(state.levels), opacity: state.opacity, dot: state.dotSize,
      pins: state.pins.join(","), query: state.query, dlayer: state.decoderLayer, threshold: state.threshold,
      proposals: state.proposals ? 1 : 0, top: state.proposalCount,
    });
    try {
      history.replaceState(null, "", "#" + fragment);
    } catch {
      // A sandboxed frame (a notebook's) may refuse: the view works, its link does not.
    }
  }

  // ---- geometry ----

  // The frame (the padded model input) in original image pixels.
  function frameSize(image) {
    return { width: image.frame[1] * image.size[1] / image.input[1], height: image.frame[0] * image.size[0] / image.input[0] };
  }

  function levelStart(image, level) {
    let start = 0;
    for (let l = 0; l < level; l++) start += image.shapes[l][0] * image.shapes[l][1];
    return start;
  }

  function encoderPixel(image, query) {
    let level = 0;
    while (level + 1 < meta.levels && query >= levelStart(image, level + 1)) level++;
    const width = image.shapes[level][1];
    const offset = query - levelStart(image, level);
    return { level, row: Math.floor(offset / width), column: offset % width };
  }

  function isKept(image, query) {
    if (!Number.isInteger(query) || query < 0 || query >= levelStart(image, meta.levels)) return false;
    const { level, row, column } = encoderPixel(image, query);
    return row % image.strides[level] === 0 && column % image.strides[level] === 0;
  }

  // The position of a kept encoder query in the embedded (subsampled) arrays.
  function keptIndex(image, query) {
    const { level, row, column } = encoderPixel(image, query);
    let index = 0;
    for (let l = 0; l < level; l++) {
      index += Math.ceil(image.shapes[l][0] / image.strides[l]) * Math.ceil(image.shapes[l][1] / image.strides[l]);
    }
    const stride = image.strides[level];
    return index + (row / stride) * Math.ceil(image.shapes[level][1] / stride) + column / stride;
  }

  // The query of `level` nearest to the normalised point (x, y), among those kept every `stride`
  // rows and columns.
  function snap(image, level, x, y, stride = image.strides[level]) {
    const [height, width] = image.shapes[level];
    const nearest = (position, size) => {
      const last = Math.floor((size - 1) / stride) * stride;
      return Math.min(Math.max(Math.round((position * size - 0.5) / stride) * stride, 0), last);
    };
    return levelStart(image, level) + nearest(y, height) * width + nearest(x, width);
  }

  function encoderQuery(image, query) {
    const pixel = encoderPixel(image, query);
    const [height, width] = image.shapes[pixel.level];
    const own = image.validRatios[pixel.level];
    // The reference of a pixel on its own level is its centre; every level sees it through the
    // valid ratios (as the encoder computes it).
    const references = image.validRatios.map((ratio) => [
      (pixel.column + 0.5) / (own[0] * width) * ratio[0], (pixel.row + 0.5) / (own[1] * height) * ratio[1],
    ]);
    const points = attentionPoints(
      array(image, `encoder.${state.encoderLayer}.locations`), array(image, `encoder.${state.encoderLayer}.weights`),
      keptIndex(image, query), meta.encoderPoints,
    );
    return { query, ...pixel, reference: references[pixel.level], references, points };
  }

  // A decoder query's box (normalised cx, cy, w, h), class and score after `layer`.
  function prediction(image, layer, query) {
    const base = layer * image.queries + query;
    const boxes = array(image, "decoder.boxes");
    const label = array(image, "decoder.labels")[base];
    return {
      query, box: range(4).map((i) => coordinate(boxes[base * 4 + i])),
      label, name: className(label), score: score(array(image, "decoder.scores")[base]),
    };
  }

  // ... with the reference the layer starts from and its sampling points.
  function decoderQuery(image, layer, query) {
    const base = layer * image.queries + query;
    const references = array(image, "decoder.references");
    return {
      ...prediction(image, layer, query),
      reference: range(4).map((i) => coordinate(references[base * 4 + i])),
      referenceIsBox: image.referenceIsBox[layer],
      points: attentionPoints(array(image, "decoder.locations"), array(image, "decoder.weights"), base, meta.decoderPoints),
    };
  }

  // One query's sampling points: normalised (x, y), head, level, point and weight.
  function attentionPoints(locations, weights, index, pointCount) {
    const points = [];
    const perQuery = meta.heads * meta.levels * pointCount;
    for (let head = 0; head < meta.heads; head++) {
      for (let level = 0; level < meta.levels; level++) {
        for (let point = 0; point < pointCount; point++) {
          const i = index * perQuery + (head * meta.levels + level) * pointCount + point;
          points.push({
            head, level, point, weight: weight(weights[i]),
            x: coordinate(locations[2 * i]), y: coordinate(locations[2 * i + 1]),
          });
        }
      }
    }
    return points;
  }

  // (cx, cy, w, h) normalised -> [x1, y1, x2, y2] in `width` x `height` pixels.
  function corners([cx, cy, w, h], width, height) {
    return [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height];
  }

  function detections(image) {
    const layer = meta.decoderLayerCount - 1;
    return range(image.queries)
      .map((query) => prediction(image, layer, query))
      .filter((detection) => detection.score >= state.threshold)
      .sort((a, b) => b.score - a.score);
  }

  // The attention weight all encoder queries put on each cell of `level`, summed over the heads shown.
  function heat(image, level) {
    const [height, width] = image.shapes[level];
    const codes = array(image, `encoder.${state.encoderLayer}.heat`);
    const total = levelStart(image, meta.levels);
    const scale = { low: 0, step: image.heatMaxima[meta.encoderLayers.indexOf(state.encoderLayer)] / 65535 };
    const start = levelStart(image, level);
    const values = new Float32Array(height * width);
    state.heads.forEach((shown, head) => {
      if (!shown) return;
      for (let i = 0; i < values.length; i++) values[i] += decode(scale, codes[head * total + start + i]);
    });
    return values;
  }

  // ---- drawing ----

  // A canvas at most `maxWidth` x `maxHeight` CSS pixels in the frame's aspect, and the scale from
  // image pixels to it.
  function prepare(canvas, image, maxWidth, maxHeight = Infinity) {
    const frame = frameSize(image);
    const ratio = window.devicePixelRatio || 1;
    const cssWidth = Math.min(maxWidth, maxHeight * frame.width / frame.height);
    const cssHeight = cssWidth * frame.height / frame.width;
    canvas.width = Math.round(cssWidth * ratio);
    canvas.height = Math.round(cssHeight * ratio);
    canvas.style.width = `${cssWidth}px`;
    canvas.style.height = `${cssHeight}px`;
    const context = canvas.getContext("2d");
    context.setTransform(ratio, 0, 0, ratio, 0, 0);
    return { context, scale: cssWidth / frame.width, frame, cssWidth, cssHeight };
  }

  function drawBackground(view, image, picture, pixelated) {
    const { context, scale, cssWidth, cssHeight } = view;
    context.fillStyle = "#777";  // padding
    context.fillRect(0, 0, cssWidth, cssHeight);
    if (!pixelated) {
      context.drawImage(picture, 0, 0, image.size[1] * scale, image.size[0] * scale);
      return;
    }
    // A level panel: the picture at the level's own resolution, one square per cell.
    const [height, width] = image.shapes[pixelated.level];
    const grid = document.createElement("canvas");
    grid.width = width;
    grid.height = height;
    const frame = frameSize(image);
    grid.getContext("2d").drawImage(picture, 0, 0, image.size[1] * width / frame.width, image.size[0] * height / frame.height);
    context.imageSmoothingEnabled = false;
    context.drawImage(grid, 0, 0, cssWidth, cssHeight);
    context.imageSmoothingEnabled = true;
    const [validWidth, validHeight] = image.validRatios[pixelated.level];
    context.fillStyle = "rgba(40, 40, 40, 0.55)";  // what the level's padding mask hides
    context.fillRect(validWidth * cssWidth, 0, cssWidth * (1 - validWidth), cssHeight);
    context.fillRect(0, validHeight * cssHeight, validWidth * cssWidth, cssHeight * (1 - validHeight));
    if (cssWidth / width >= 6) {
      context.strokeStyle = "rgba(255, 255, 255, 0.25)";
      context.lineWidth = 1;
      context.beginPath();
      for (let column = 1; column < width; column++) {
        context.moveTo(column * cssWidth / width, 0);
        context.lineTo(column * cssWidth / width, cssHeight);
      }
      for (let row = 1; row < height; row++) {
        context.moveTo(0, row * cssHeight / height);
        context.lineTo(cssWidth, row * cssHeight / height);
      }
      context.stroke();
    }
  }

  // Sampling points as dots (marker 0) or squares (marker 1): heaviest first, so that lighter ones
  // stay visible on top; area proportional to the weight as computed, never rescaled.
  function drawPoints(view, points, marker, record) {
    const { context, scale, frame } = view;
    const shown = points.filter((p) => state.heads[p.head] && state.levels[p.level]).sort((a, b) => b.weight - a.weight);
    context.globalAlpha = state.opacity;
    for (const p of shown) {
      const x = p.x * frame.width * scale;
      const y = p.y * frame.height * scale;
      const radius = Math.max(1, state.dotSize * DOT_RADIUS * Math.sqrt(p.weight));
      context.beginPath();
      if (marker === 0) context.arc(x, y, radius, 0, 2 * Math.PI);
      else context.rect(x - radius, y - radius, 2 * radius, 2 * radius);
      context.fillStyle = meta.headColours[p.head];
      context.fill();
      context.lineWidth = 0.75;
      context.strokeStyle = "black";
      context.stroke();
      if (record) record.push({ ...p, x: p.x * frame.width, y: p.y * frame.height });
    }
    context.globalAlpha = 1;
  }

  function drawCross(view, x, y, label) {
    const { context, scale } = view;
    const [cx, cy] = [x * scale, y * scale];
    for (const [colour, width] of [["black", 4], ["white", 2]]) {
      context.strokeStyle = colour;
      context.lineWidth = width;
      context.beginPath();
      context.moveTo(cx - 9, cy);
      context.lineTo(cx + 9, cy);
      context.moveTo(cx, cy - 9);
      context.lineTo(cx, cy + 9);
      context.stroke();
    }
    if (label) drawLabel(view, label, cx + 8, cy - 8, "white");
  }

  function drawBox(view, [x1, y1, x2, y2], colour, { dashed = false, width = 2, label = null } = {}) {
    const { context, scale } = view;
    context.setLineDash(dashed ? [6, 4] : []);
    for (const [stroke, lineWidth] of [["black", width + 2], [colour, width]]) {
      context.strokeStyle = stroke;
      context.lineWidth = lineWidth;
      context.strokeRect(x1 * scale, y1 * scale, (x2 - x1) * scale, (y2 - y1) * scale);
    }
    context.setLineDash([]);
    return label ? drawLabel(view, label, x1 * scale, y1 * scale - 2, colour) : null;
  }

  // Text on a filled rectangle above (x, y), moved onto the canvas where it would run off it (a box
  // at the image's edge); returns the rectangle in CSS pixels.
  function drawLabel(view, text, x, y, background) {
    const { context, cssWidth } = view;
    context.font = "12px system-ui, sans-serif";
    const width = context.measureText(text).width + 6;
    const left = Math.max(0, Math.min(x, cssWidth - width));
    const top = Math.max(0, y - 15);
    context.fillStyle = background;
    context.fillRect(left, top, width, 15);
    context.fillStyle = "black";
    context.textBaseline = "middle";
    context.fillText(text, left + 3, top + 8);
    return { x: left, y: top, width, height: 15 };
  }

  function drawHeat(view, values, width, height, smooth) {
    let largest = 0;
    for (const value of values) largest = Math.max(largest, value);
    const grid = document.createElement("canvas");
    grid.width = width;
    grid.height = height;
    const gridContext = grid.getContext("2d");
    const pixels = gridContext.createImageData(width, height);
    values.forEach((value, i) => {
      const t = largest > 0 ? value / largest : 0;
      const [r, g, b] = heatColour(t);
      pixels.data.set([r, g, b, Math.round(255 * Math.sqrt(t))], 4 * i);
    });
    gridContext.putImageData(pixels, 0, 0);
    view.context.globalAlpha = state.opacity;
    view.context.imageSmoothingEnabled = smooth;
    view.context.drawImage(grid, 0, 0, view.cssWidth, view.cssHeight);
    view.context.imageSmoothingEnabled = true;
    view.context.globalAlpha = 1;
    return largest;
  }

  function heatColour(t) {
    const position = Math.min(Math.max(t, 0), 1) * (HEAT_STOPS.length - 1);
    const i = Math.min(Math.floor(position), HEAT_STOPS.length - 2);
    const f = position - i;
    return HEAT_STOPS[i].map((channel, c) => Math.round(channel + f * (HEAT_STOPS[i + 1][c] - channel)));
  }

  function render() {
    const image = meta.images[state.image];
    const picture = pictures[state.image];
    if (!picture || !picture.complete) return;
    // The picture and the panels take the window's height below the controls less three lines of
    // info, so that the controls and what the mouse points at stay in view.
    const height = heightBelowControls();
    const panelHeight = Math.max(PANEL_WIDTH / 2, panelRowHeight(height));
    const panels = [...$("panels").querySelectorAll("canvas")].map((canvas, level) => {
      const view = prepare(canvas, image, PANEL_WIDTH, panelHeight);
      drawBackground(view, image, picture, { level });
      return view;
    });
    // The picture takes the width the panels leave (all of it where they wrap below).
    const width = $("main").clientWidth;
    const beside = width - $("panels").offsetWidth - 12;
    const main = prepare($("picture"), image, beside >= 320 ? beside : width, Math.max(320, height));
    drawBackground(main, image, picture, null);
    const record = { view: state.view, image: state.image, frame: main.frame, scale: main.scale, queries: [], references: [], points: [], boxes: [], heat: null };
    const info = { encoder: renderEncoder, decoder: renderDecoder, heat: renderHeat }[state.view](image, main, panels, record);
    $("info").textContent = info;
    $("legend").textContent = legend();
    drawn = record;
    writeFragment();
  }

  function heightBelowControls() {
    const top = $("main").getBoundingClientRect().top + window.scrollY;
    const info = getComputedStyle($("info"));
    return window.innerHeight - top - parseFloat(info.marginTop) - 3 * parseFloat(info.lineHeight);
  }

  // The height of a panel's picture such that its rows, with their captions, fit in `height`.
  function panelRowHeight(available) {
    const figures = [...$("panels").children];
    const rows = Math.ceil(figures.length / 2);
    const height = (element) => element.getBoundingClientRect().height;
    const caption = Math.max(...figures.map((figure) => height(figure) - height(figure.querySelector("canvas"))));
    return (available - (rows - 1) * parseFloat(getComputedStyle($("panels")).rowGap)) / rows - caption;
  }

  function renderEncoder(image, main, panels, record) {
    const shown = [...state.pins];
    if (hovered && shown.length < 2 && !shown.includes(hovered.query)) shown.push(hovered.query);
    const lines = [];
    shown.forEach((query, marker) => {
      const q = encoderQuery(image, query);
      const label = state.pins.includes(query) ? "AB"[state.pins.indexOf(query)] : "";
      drawPoints(main, q.points, marker, record.points);
      panels.forEach((panel, level) => {
        drawPoints(panel, q.points.filter((p) => p.level === level), marker, null);
        drawCross(panel, q.references[level][0] * panel.frame.width, q.references[level][1] * panel.frame.height, label);
      });
      const [x, y] = [q.reference[0] * main.frame.width, q.reference[1] * main.frame.height];
      drawCross(main, x, y, label);
      record.queries.push(query);
      record.references.push({ query, x, y });
      const heaviest = q.points.reduce((a, b) => (b.weight > a.weight ? b : a));
      lines.push(`${label || "hover"}: level ${q.level} query at row ${q.row}, column ${q.column} ` +
        `(image pixel ${x.toFixed(1)}, ${y.toFixed(1)}); its heaviest point: head ${heaviest.head}, ` +
        `level ${heaviest.level}, weight ${heaviest.weight.toFixed(3)}`);
    });
    const layer = `Encoder layer ${state.encoderLayer + 1} of ${meta.encoderLayerCount}.`;
    return shown.length ? `${layer}\n${lines.join("\n")}`
      : `${layer} Hover over the image to see a level-${state.queryLevel} query's sampling points; click to pin (two can be compared).`;
  }

  function renderDecoder(image, main, panels, record) {
    const frame = main.frame;
    const found = detections(image);
    for (const d of found) {
      const box = corners(d.box, image.size[1], image.size[0]);
      main.context.globalAlpha = state.query === -1 || state.query === d.query ? 1 : 0.45;
      const label = drawBox(main, box, "#ffd400", { label: `${d.name} ${d.score.toFixed(2)}` });
      record.boxes.push({ kind: "detection", query: d.query, name: d.name, score: d.score, box, label });
    }
    main.context.globalAlpha = 1;
    if (state.proposals) {
      const boxes = array(image, "proposals.boxes");
      const scores = array(image, "proposals.scores");
      for (let i = 0; i < Math.min(state.proposalCount, image.queries); i++) {
        const box = corners(range(4).map((c) => coordinate(boxes[4 * i + c])), image.size[1], image.size[0]);
        const proposalScore = score(scores[i]);
        const label = drawBox(main, box, "#ff8c1a", { width: 1, label: proposalScore.toFixed(2) });
        record.boxes.push({ kind: "proposal", query: i, score: proposalScore, box, label });
      }
    }
    const summary = `${found.length} detection(s) scoring at least ${state.threshold.toFixed(2)} in the last decoder layer.`;
    if (state.query === -1) return `${summary} Click one, or choose any query from the list, to see its attention layer by layer.`;

    const layer = state.decoderLayer - 1;
    const q = decoderQuery(image, layer, state.query);
    drawPoints(main, q.points, 0, record.points);
    const reference = q.referenceIsBox ? corners(q.reference, frame.width, frame.height) : null;
    const [x, y] = [q.reference[0] * frame.width, q.reference[1] * frame.height];
    if (reference) drawBox(main, reference, "white", { dashed: true });
    drawCross(main, x, y, "");
    const predicted = corners(q.box, image.size[1], image.size[0]);
    const label = drawBox(main, predicted, "#00e5ff", { label: `layer ${layer + 1}: ${q.name} ${q.score.toFixed(2)}` });
    record.queries.push(state.query);
    record.references.push({ query: state.query, x, y, box: reference });
    record.boxes.push({ kind: "prediction", query: state.query, name: q.name, score: q.score, box: predicted, label });
    panels.forEach((panel, level) => {
      drawPoints(panel, q.points.filter((p) => p.level === level), 0, null);
      // The reference as this level sees it (the data hold the first level's view).
      const ratio = image.validRatios[level].map((r, c) => r / image.validRatios[0][c]);
      drawCross(panel, x * ratio[0], y * ratio[1], "");
    });
    const where = reference
      ? `reference box (${reference.map((v) => v.toFixed(1)).join(", ")})`
      : `reference point (${x.toFixed(1)}, ${y.toFixed(1)})`;
    return `${summary}\nQuery ${state.query}, decoder layer ${layer + 1} of ${meta.decoderLayerCount}: starts from its ${where}; ` +
      `its box after this layer: ${q.name} ${q.score.toFixed(2)} (${predicted.map((v) => v.toFixed(1)).join(", ")}).`;
  }

  function renderHeat(image, main, panels, record) {
    // On the picture: the weight per image pixel summed over the levels shown, each level's
    // interpolated bilinearly between its cell centres, on a grid 4 times finer than the first level's.
    const maps = range(meta.levels).map((level) => heat(image, level));
    const [height, width] = image.shapes[0].map((size) => 4 * size);
    const density = new Float32Array(height * width);
    const frame = main.frame;
    range(meta.levels).filter((level) => state.levels[level]).forEach((level) => {
      const [levelHeight, levelWidth] = image.shapes[level];
      const cellArea = (frame.width / levelWidth) * (frame.height / levelHeight);
      const at = (row, column) => maps[level][
        Math.min(Math.max(row, 0), levelHeight - 1) * levelWidth + Math.min(Math.max(column, 0), levelWidth - 1)];
      for (let row = 0; row < height; row++) {
        const y = (row + 0.5) / height * levelHeight - 0.5;
        const top = Math.floor(y);
        const dy = y - top;
        for (let column = 0; column < width; column++) {
          const x = (column + 0.5) / width * levelWidth - 0.5;
          const left = Math.floor(x);
          const dx = x - left;
          const value = (1 - dy) * ((1 - dx) * at(top, left) + dx * at(top, left + 1))
            + dy * ((1 - dx) * at(top + 1, left) + dx * at(top + 1, left + 1));
          density[row * width + column] += value / cellArea;
        }
      }
    });
    drawHeat(main, density, width, height, true);
    const maxima = panels.map((panel, level) => (state.levels[level]
      ? drawHeat(panel, maps[level], image.shapes[level][1], image.shapes[level][0], false) : 0));
    record.heat = { maxima, totals: maps.map((values) => values.reduce((a, b) => a + b, 0)) };
    const layer = `Encoder layer ${state.encoderLayer + 1} of ${meta.encoderLayerCount}: the attention weight all ` +
      `${levelStart(image, meta.levels)} encoder queries put on each cell.`;
    if (!hovered) return `${layer} Hover to read a cell's value.`;
    const { level, row, column } = encoderPixel(image, hovered.query);
    const value = maps[level][row * image.shapes[level][1] + column];
    return `${layer}\nLevel ${level}, row ${row}, column ${column}: ${value.toFixed(3)} (panel maximum ${maxima[level].toFixed(3)})`;
  }

  function legend() {
    const dots = "Dots: sampling points, coloured by head, area proportional to the attention weight as computed (at least 1 pixel).";
    return {
      encoder: `+ the query's reference point (A and B: pinned queries; the second query's points are squares). ${dots} ` +
        "Panels: each level on its own grid, its padding shaded.",
      decoder: "Yellow: detections of the last decoder layer. The chosen query: its reference (+, dashed white: a reference box) " +
        `and its box after the layer (cyan). ${dots}`,
      heat: "Each sampling point's weight shared among the cells it interpolates, summed over all encoder queries and the heads " +
        "shown. Picture: weight per image pixel over the levels shown; panels: each level scaled to its own maximum.",
    }[state.view];
  }

  // ---- controls ----

  function option(select, value, text) {
    const element = document.createElement("option");
    element.value = value;
    element.textContent = text;
    select.append(element);
  }

  function toggles(container, count, key, colours) {
    for (let i = 0; i < count; i++) {
      const label = document.createElement("label");
      const input = document.createElement("input");
      input.type = "checkbox";
      input.dataset.index = i;
      input.addEventListener("change", () => { state[key][i] = input.checked; render(); });
      label.append(input);
      if (colours) {
        const swatch = document.createElement("span");
        swatch.className = "swatch";
        swatch.style.background = colours[i];
        label.append(swatch);
      }
      label.append(` ${i}`);
      container.append(label);
    }
  }

  function buildControls() {
    meta.images.forEach((image, i) => option($("image"), i, image.name));
    $("image-picker").hidden = meta.images.length < 2;
    meta.encoderLayers.forEach((layer) => option($("encoder-layer"), layer, `${layer + 1} of ${meta.encoderLayerCount}`));
    range(meta.levels).forEach((level) => option($("query-level"), level, `${level}`));
    toggles($("heads"), meta.heads, "heads", meta.headColours);
    toggles($("levels"), meta.levels, "levels", null);
    $("decoder-layer").max = meta.decoderLayerCount;
    $("proposal-controls").hidden = !meta.twoStage;
    for (const text of meta.warnings) {
      const item = document.createElement("li");
      item.textContent = text;
      $("notices").append(item);
    }
    const panels = $("panels");
    range(meta.levels).forEach((level) => {
      const figure = document.createElement("figure");
      // As wide as the widest panel, whatever the level's aspect: its caption wraps to the same
      // lines whatever height the panel is given.
      figure.style.width = `${PANEL_WIDTH}px`;
      const caption = document.createElement("figcaption");
      caption.dataset.level = level;
      const canvas = document.createElement("canvas");
      canvas.addEventListener("mousemove", (event) => hover(event, canvas, level));
      canvas.addEventListener("mouseleave", () => { hovered = null; render(); });
      canvas.addEventListener("click", (event) => click(event, canvas, level));
      figure.append(canvas, caption);
      panels.append(figure);
    });

    document.querySelectorAll("#views button").forEach((button) => {
      button.addEventListener("click", () => { state.view = button.dataset.view; hovered = null; sync(); });
    });
    const on = (id, event, apply) => $(id).addEventListener(event, () => { apply($(id)); sync(); });
    on("image", "change", (e) => {
      state.image = Number(e.value);
      state.pins = [];
      state.query = -1;
    });
    on("encoder-layer", "change", (e) => { state.encoderLayer = Number(e.value); });
    on("query-level", "change", (e) => { state.queryLevel = Number(e.value); });
    on("threshold", "input", (e) => { state.threshold = Number(e.value); });
    on("decoder-layer", "input", (e) => { state.decoderLayer = Number(e.value); });
    on("query", "change", (e) => { state.query = Number(e.value); });
    on("proposals", "change", (e) => { state.proposals = e.checked; });
    on("proposal-count", "change", (e) => {
      state.proposalCount = Math.min(Math.max(Math.round(Number(e.value)) || 1, 1), meta.images[state.image].queries);
    });
    on("opacity", "input", (e) => { state.opacity = Number(e.value); });
    on("dot-size", "input", (e) => { state.dotSize = Number(e.value); });
    $("controls").addEventListener("submit", (event) => event.preventDefault());
    const picture = $("picture");
    // The picture's level: the encoder view's chosen one; in the heat map the finest level shown.
    const pictureLevel = () => (state.view === "heat" ? Math.max(0, state.levels.indexOf(true)) : state.queryLevel);
    picture.addEventListener("mousemove", (event) => hover(event, picture, pictureLevel()));
    picture.addEventListener("mouseleave", () => { hovered = null; render(); });
    picture.addEventListener("click", (event) => click(event, picture, pictureLevel()));
    $("save").addEventListener("click", savePicture);
    window.addEventListener("resize", render);
    window.addEventListener("hashchange", () => { readFragment(); sync(); });
  }

  function updateCaptions(image) {
    document.querySelectorAll("figcaption").forEach((caption) => {
      const level = Number(caption.dataset.level);
      const [height, width] = image.shapes[level];
      const stride = image.strides[level] > 1 ? `, queries kept: 1 in ${image.strides[level]} rows and columns` : "";
      caption.textContent = `level ${level}: ${width} × ${height} cells of ${(image.frame[1] / width).toFixed(1)} input pixels${stride}`;
    });
  }

  // The controls show the state; then the picture is drawn again (once loaded).
  function sync() {
    const image = meta.images[state.image];
    loadPicture(state.image);
    updateCaptions(image);
    $("image").value = state.image;
    document.querySelectorAll("#views button").forEach((button) => button.setAttribute("aria-pressed", button.dataset.view === state.view));
    document.querySelectorAll("[data-views]").forEach((element) => { element.hidden = !element.dataset.views.split(" ").includes(state.view); });
    $("encoder-layer").value = state.encoderLayer;
    $("query-level").value = state.queryLevel;
    $("threshold").value = state.threshold;
    $("threshold-value").textContent = state.threshold.toFixed(2);
    $("decoder-layer").value = state.decoderLayer;
    $("decoder-layer-value").textContent = `${state.decoderLayer} of ${meta.decoderLayerCount}`;
    $("proposals").checked = state.proposals;
    $("proposal-count").max = image.queries;
    $("proposal-count").value = state.proposalCount;
    $("opacity").value = state.opacity;
    $("dot-size").value = state.dotSize;
    document.querySelectorAll("#heads input").forEach((input) => { input.checked = state.heads[input.dataset.index]; });
    document.querySelectorAll("#levels input").forEach((input) => { input.checked = state.levels[input.dataset.index]; });
    const select = $("query");
    if (select.dataset.image !== String(state.image)) {
      select.replaceChildren();
      option(select, -1, "none");
      const layer = meta.decoderLayerCount - 1;
      range(image.queries)
        .map((query) => prediction(image, layer, query))
        .sort((a, b) => b.score - a.score)
        .forEach((q) => option(select, q.query, `${q.query}: ${q.name} ${q.score.toFixed(2)}`));
      select.dataset.image = state.image;
    }
    select.value = state.query;
    render();
  }

  // Normalised frame coordinates of a mouse event on `canvas`.
  function position(event, canvas) {
    const bounds = canvas.getBoundingClientRect();
    return [(event.clientX - bounds.left) / bounds.width, (event.clientY - bounds.top) / bounds.height];
  }

  function hover(event, canvas, level) {
    if (state.view === "decoder") return;
    const [x, y] = position(event, canvas);
    // The heat map holds every cell; the encoder view the queries kept.
    const stride = state.view === "heat" ? 1 : undefined;
    hovered = { query: snap(meta.images[state.image], level, x, y, stride), level };
    render();
  }

  function click(event, canvas, level) {
    const image = meta.images[state.image];
    const [x, y] = position(event, canvas);
    if (state.view === "encoder") {
      const query = snap(image, level, x, y);
      state.pins = state.pins.includes(query) ? state.pins.filter((q) => q !== query) : [...state.pins, query].slice(-2);
    } else if (state.view === "decoder" && canvas === $("picture")) {
      // The smallest detection under the mouse.
      const frame = frameSize(image);
      const [px, py] = [x * frame.width, y * frame.height];
      const under = detections(image)
        .map((d) => ({ query: d.query, box: corners(d.box, image.size[1], image.size[0]) }))
        .filter(({ box }) => box[0] <= px && px <= box[2] && box[1] <= py && py <= box[3])
        .sort((a, b) => (a.box[2] - a.box[0]) * (a.box[3] - a.box[1]) - (b.box[2] - b.box[0]) * (b.box[3] - b.box[1]));
      if (!under.length) return;
      state.query = under[0].query;
    } else {
      return;
    }
    sync();
  }

  // The picture and the level panels side by side, with the head colours, as a PNG download.
  function savePicture() {
    const main = $("picture");
    const panels = [...$("panels").querySelectorAll("canvas")];
    const ratio = window.devicePixelRatio || 1;
    const gap = Math.round(8 * ratio);
    const legendHeight = Math.round(24 * ratio);
    const panelWidth = panels.length ? panels[0].width : 0;
    const panelsHeight = panels.reduce((sum, panel) => sum + panel.height + gap, 0);
    const canvas = document.createElement("canvas");
    canvas.width = main.width + gap + panelWidth;
    canvas.height = Math.max(main.height, panelsHeight) + legendHeight;
    const context = canvas.getContext("2d");
    context.fillStyle = "white";
    context.fillRect(0, 0, canvas.width, canvas.height);
    context.drawImage(main, 0, 0);
    let top = 0;
    for (const panel of panels) {
      context.drawImage(panel, main.width + gap, top);
      top += panel.height + gap;
    }
    context.scale(ratio, ratio);
    context.font = "13px system-ui, sans-serif";
    context.textBaseline = "middle";
    let left = 4;
    const y = canvas.height / ratio - 12;
    meta.headColours.forEach((colour, head) => {
      if (!state.heads[head]) return;
      context.fillStyle = colour;
      context.beginPath();
      context.arc(left + 6, y, 6, 0, 2 * Math.PI);
      context.fill();
      context.stroke();
      context.fillStyle = "black";
      context.fillText(`head ${head}`, left + 15, y);
      left += 70;
    });
    const link = document.createElement("a");
    link.download = `explore-${state.view}.png`;
    link.href = canvas.toDataURL("image/png");
    link.click();
  }

  function loadPicture(index) {
    if (pictures[index]) return;
    const picture = new Image();
    picture.addEventListener("load", () => { if (index === state.image) render(); });
    picture.src = meta.images[index].picture;
    pictures[index] = picture;
  }

  Object.defineProperty(window, "explore", {
    value: Object.freeze({
      // A copy of what the last drawing drew: points and boxes in original image pixels.
      get drawn() { return drawn && structuredClone(drawn); },
      get state() { return structuredClone(state); },
    }),
  });
  buildControls();
  readFragment();
  sync();
})();
