"""The explore page: its data are what the model computed, it fits its budget, nothing from the data
can run; and, in headless Chromium, that it draws the model's points and boxes where the model put
them, follows the mouse, the sliders and its URL, saves pictures and makes no request."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_convert

from deformable_detr import Detector, build_model, ms_deform_attn_reference, save_checkpoint
from deformable_detr.cli import main
from deformable_detr.explore import COORDINATES, SCORES, WEIGHTS, explore
from deformable_detr.model import MSDeformAttn, capture_attention
from deformable_detr.precision import forward
from deformable_detr.visualize import head_colours

from browser import chromium, find_chromium

HEIGHT, WIDTH = 96, 128
EVIL = "</script><img src=x onerror=alert(1)>"
CLASS_NAMES = {label: f"{EVIL} {label}" for label in range(6)}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=6, two_stage=True).eval()
    # Offsets, weights, box updates and scores that depend on the query, unlike the initial ones.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MSDeformAttn):
                module.sampling_offsets.weight.normal_(std=0.1)
                module.attention_weights.weight.normal_(std=0.1)
        for box_head, class_head in zip(model.bbox_embed, model.class_embed):
            box_head.layers[-1].weight.normal_(std=0.05)
            class_head.bias.normal_()
    return model


@pytest.fixture(scope="module")
def detector(model):
    return Detector(model, class_names=CLASS_NAMES, image_size=HEIGHT)


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, size, dtype=torch.uint8, generator=generator) for size in [(3, HEIGHT, WIDTH), (3, 120, 90)]]


@pytest.fixture(scope="module")
def page(detector, images):
    return explore(detector, images)


@pytest.fixture(scope="module")
def page_file(page, tmp_path_factory):
    return page.save(tmp_path_factory.mktemp("explore") / "explore.html")


# ---- reading the page as its script does ----


def page_data(text: str) -> tuple[dict, bytes]:
    meta = re.search(r'<script type="application/json" id="explore-meta">(.*?)</script>', text, re.S)[1]
    data = re.search(r'<script type="application/octet-stream" id="explore-data">(.*?)</script>', text, re.S)[1]
    return json.loads(meta), base64.b64decode(data)


def embedded(image: dict, data: bytes, name: str) -> np.ndarray:
    spec = image["arrays"][name]
    dtype = {"Uint8Array": "<u1", "Uint16Array": "<u2"}[spec["type"]]
    return np.frombuffer(data, dtype, spec["length"], spec["offset"])


def decoded(meta: dict, scale: str, codes: np.ndarray, shape) -> torch.Tensor:
    low, step = meta["scales"][scale]["low"], meta["scales"][scale]["step"]
    return torch.from_numpy(low + codes.astype(np.float64) * step).float().view(shape)


def captured(detector, image):
    """The records and outputs of the model's forward on ``image``, and every attention module's
    projected value and op output, taken by hooks."""
    model = detector.model
    values, outputs_of_op = {}, {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, MSDeformAttn):
            handles.append(module.value_proj.register_forward_hook(
                lambda _, args, out, name=name: values.__setitem__(name, out)))
            handles.append(module.output_proj.register_forward_pre_hook(
                lambda _, args, name=name: outputs_of_op.__setitem__(name, args[0])))  # fmt: skip
    try:
        with torch.no_grad(), capture_attention(model) as records:
            outputs = model(detector.prepare(image)[None])
    finally:
        for handle in handles:
            handle.remove()
    return {record.name: record for record in records}, outputs, values, outputs_of_op


def encoder(layer):
    return f"transformer.encoder.layers.{layer}.self_attn"


def decoder(layer):
    return f"transformer.decoder.layers.{layer}.cross_attn"


def decoder_attention(meta, image, data):
    layers, queries = meta["decoderLayerCount"], image["queries"]
    shape = (layers, queries, meta["heads"], meta["levels"], meta["decoderPoints"])
    locations = decoded(meta, "coordinate", embedded(image, data, "decoder.locations"), (*shape, 2))
    weights = decoded(meta, "weight", embedded(image, data, "decoder.weights"), shape)
    return locations, weights


def encoder_attention(meta, image, data, layer, queries):
    shape = (queries, meta["heads"], meta["levels"], meta["encoderPoints"])
    locations = decoded(meta, "coordinate", embedded(image, data, f"encoder.{layer}.locations"), (*shape, 2))
    weights = decoded(meta, "weight", embedded(image, data, f"encoder.{layer}.weights"), shape)
    return locations, weights


def close_within(actual, expected, step):
    # Rounding to the nearest code errs by half a step; float32 arithmetic adds its own ulps.
    torch.testing.assert_close(actual, expected.float(), rtol=0, atol=step / 2 + 1e-6)


# ---- the data ----


def test_embedded_data_equal_the_captured_within_a_quantisation_step(page, detector, images):
    meta, data = page_data(page.html)
    config = detector.model.config
    assert meta["encoderLayers"] == [config.encoder_layers - 1] and len(meta["images"]) == 2
    for image, pixels in zip(meta["images"], images):
        records, outputs, _, _ = captured(detector, pixels)
        last = records[encoder(config.encoder_layers - 1)]
        queries = last.sampling_locations.shape[1]
        locations, weights = encoder_attention(meta, image, data, config.encoder_layers - 1, queries)
        close_within(locations, last.sampling_locations[0].clamp(-0.5, 1.5), COORDINATES.step)
        close_within(weights, last.attention_weights[0], WEIGHTS.step)

        locations, weights = decoder_attention(meta, image, data)
        for layer in range(config.decoder_layers):
            record = records[decoder(layer)]
            close_within(locations[layer], record.sampling_locations[0].clamp(-0.5, 1.5), COORDINATES.step)
            close_within(weights[layer], record.attention_weights[0], WEIGHTS.step)
            references = decoded(meta, "coordinate", embedded(image, data, "decoder.references"), (config.decoder_layers, -1, 4))
            close_within(references[layer], record.reference_points[0, :, 0], COORDINATES.step)
        # Two-stage with refinement: the first layer starts from the proposals' boxes too.
        assert image["referenceIsBox"] == [True] * config.decoder_layers

        predictions = [*outputs["aux_outputs"], outputs]
        boxes = decoded(meta, "coordinate", embedded(image, data, "decoder.boxes"), (config.decoder_layers, -1, 4))
        scores = decoded(meta, "score", embedded(image, data, "decoder.scores"), (config.decoder_layers, -1))
        labels = torch.from_numpy(embedded(image, data, "decoder.labels").astype(np.int64)).view(config.decoder_layers, -1)
        for layer, prediction in enumerate(predictions):
            close_within(boxes[layer], prediction["pred_boxes"][0], COORDINATES.step)
            best = prediction["pred_logits"][0].sigmoid().max(-1)
            close_within(scores[layer], best.values, SCORES.step)
            assert torch.equal(labels[layer], best.indices)
        proposals = decoded(meta, "coordinate", embedded(image, data, "proposals.boxes"), (-1, 4))
        close_within(proposals, records[decoder(0)].reference_points[0, :, 0], COORDINATES.step)
        assert image["size"] == list(pixels.shape[-2:]) and image["frame"] == image["input"]
        assert image["validRatios"] == [[1.0, 1.0]] * config.num_feature_levels


def test_the_reference_op_on_the_decoded_points_gives_the_module_output(page, detector, images):
    """The page shows what the model computed: the attention op fed the embedded locations and
    weights reproduces every embedded layer's output, to within what the quantisation allows."""
    meta, data = page_data(page.html)
    image, pixels = meta["images"][0], images[0]
    records, _, values, outputs_of_op = captured(detector, pixels)
    config = detector.model.config
    locations, weights = decoder_attention(meta, image, data)
    layers = [(decoder(layer), locations[layer], weights[layer]) for layer in range(config.decoder_layers)]
    last = encoder(config.encoder_layers - 1)
    layers.append((last, *encoder_attention(meta, image, data, config.encoder_layers - 1, -1)))
    for name, layer_locations, layer_weights in layers:
        record = records[name]
        shapes = record.spatial_shapes
        starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
        value = values[name].view(1, -1, config.num_heads, config.d_model // config.num_heads)
        output = ms_deform_attn_reference(value, shapes, starts, layer_locations[None], layer_weights[None])
        # Each weight errs by at most half a step; each location by half a step, which moves a
        # bilinear sample by at most that many cells times twice the largest value.
        weight_error = ms_deform_attn_reference(
            value.abs(), shapes, starts, layer_locations[None], torch.full_like(layer_weights[None], WEIGHTS.step / 2)
        )
        location_error = COORDINATES.step / 2 * float(shapes.max()) * 2 * 2 * float(value.abs().max())
        bound = weight_error + location_error + 1e-5
        expected = outputs_of_op[name].view_as(output)
        assert ((output - expected).abs() <= bound).all(), name
        assert bound.mean() < 0.1 * expected.abs().mean(), name  # a bound that still says something


def test_the_heat_map_is_the_weight_all_encoder_queries_put_on_each_pixel(page, detector, images):
    """The gradient of all queries' summed outputs with respect to a value of ones is, per pixel
    and head, the attention weight the pixel receives: what the heat map holds."""
    meta, data = page_data(page.html)
    image = meta["images"][0]
    config = detector.model.config
    record = captured(detector, images[0])[0][encoder(config.encoder_layers - 1)]
    shapes = record.spatial_shapes
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    ones = torch.ones(1, int(shapes.prod(1).sum()), config.num_heads, 1, requires_grad=True)
    ms_deform_attn_reference(ones, shapes, starts, record.sampling_locations, record.attention_weights).sum().backward()
    expected = ones.grad[0, :, :, 0].T
    maximum = image["heatMaxima"][0]
    heat = torch.from_numpy(embedded(image, data, f"encoder.{config.encoder_layers - 1}.heat").astype(np.float64))
    heat = heat.view_as(expected).float() * maximum / 65535
    assert maximum == pytest.approx(float(expected.max()), rel=1e-5)
    close_within(heat, expected, maximum / 65535)


@pytest.mark.filterwarnings("ignore:bfloat16 is emulated:RuntimeWarning")  # where it is: these are its numbers
def test_a_bfloat16_detector_is_explored_in_bfloat16_as_it_predicts(model, images):
    detector = Detector(model, class_names=CLASS_NAMES, image_size=HEIGHT, dtype=torch.bfloat16)
    meta, data = page_data(explore(detector, images[:1]).html)
    layers = meta["decoderLayerCount"]
    scores = decoded(meta, "score", embedded(meta["images"][0], data, "decoder.scores"), (layers, -1))[-1]
    inputs = detector.prepare(images[0])[None]
    with torch.no_grad():
        in_bfloat16 = forward(detector.model, inputs, dtype=torch.bfloat16)["pred_logits"][0].sigmoid().amax(-1)
        in_float32 = detector.model(inputs)["pred_logits"][0].sigmoid().amax(-1)
    close_within(scores, in_bfloat16, SCORES.step)
    assert (in_float32 - in_bfloat16).abs().max() > SCORES.step  # the two are told apart


def test_without_refinement_the_decoder_starts_from_points(images):
    detector = Detector(build_model("tiny", num_classes=6, with_box_refine=False).eval(), image_size=HEIGHT)
    meta, data = page_data(explore(detector, images[0]).html)
    image = meta["images"][0]
    records = captured(detector, images[0])[0]
    assert image["referenceIsBox"] == [False] * meta["decoderLayerCount"] and not meta["twoStage"]
    assert not any(name.startswith("proposals.") for name in image["arrays"])
    references = decoded(meta, "coordinate", embedded(image, data, "decoder.references"), (meta["decoderLayerCount"], -1, 4))
    for layer in range(meta["decoderLayerCount"]):
        close_within(references[layer, :, :2], records[decoder(layer)].reference_points[0, :, 0], COORDINATES.step)
    close_within(references[..., 2:], torch.zeros_like(references[..., 2:]), COORDINATES.step)  # no size


def test_a_page_over_its_budget_subsamples_encoder_queries_and_says_so(page, detector, images):
    budget = page.size - 1
    smaller = explore(detector, images, max_bytes=budget)
    assert smaller.size <= budget
    assert len(smaller.warnings) == 1 and "subsampled" in smaller.warnings[0]
    meta, data = page_data(smaller.html)
    assert meta["warnings"] == list(smaller.warnings)
    image = meta["images"][0]
    assert image["strides"][0] == 2 and image["strides"][1:] == [1] * (len(image["strides"]) - 1)
    # The kept queries: every other row and column of the first level, every query of the others.
    layer = detector.model.config.encoder_layers - 1
    record = captured(detector, images[0])[0][encoder(layer)]
    (height, width), *_ = record.spatial_shapes.tolist()
    first = torch.arange(height * width).view(height, width)[::2, ::2].flatten()
    kept = torch.cat([first, torch.arange(height * width, record.sampling_locations.shape[1])])
    locations, _ = encoder_attention(meta, image, data, layer, len(kept))
    close_within(locations, record.sampling_locations[0, kept].clamp(-0.5, 1.5), COORDINATES.step)
    # The heat maps still count every query.
    assert embedded(image, data, f"encoder.{layer}.heat").size == detector.model.config.num_heads * record.sampling_locations.shape[1]


def test_encoder_layers_all_embeds_every_layer_and_bad_choices_are_refused(detector, images):
    count = detector.model.config.encoder_layers
    meta, _ = page_data(explore(detector, images[0], encoder_layers="all").html)
    assert meta["encoderLayers"] == list(range(count))
    assert set(meta["images"][0]["arrays"]) >= {f"encoder.{layer}.{kind}" for layer in range(count) for kind in ("locations", "weights", "heat")}
    assert page_data(explore(detector, images[0], encoder_layers=[0]).html)[0]["encoderLayers"] == [0]
    for choice in ("first", [count], [], [0.5], 1):
        with pytest.raises(ValueError, match="encoder_layers"):
            explore(detector, images[0], encoder_layers=choice)
    with pytest.raises(ValueError, match="max_bytes must be a whole number of at least 1, got 0"):
        explore(detector, images[0], max_bytes=0)
    without_encoder = Detector(build_model("tiny", num_classes=6, encoder_layers=0).eval(), image_size=HEIGHT)
    with pytest.raises(ValueError, match="^explore shows the encoder's attention, and this model has no encoder layers$"):
        explore(without_encoder, images[0])


def test_padding_shows_in_the_frame_and_the_valid_ratios(detector, images):
    meta, _ = page_data(explore(detector, images[0], pad_to_multiple=64).html)
    image = meta["images"][0]
    assert image["input"] == [HEIGHT, WIDTH] and image["frame"] == [128, 128]
    # Level 0 (stride 8) of the padded 128 x 128 input: 16 x 16 cells, the last 4 rows padding.
    assert image["shapes"][0] == [16, 16] and image["validRatios"][0] == [1.0, 0.75]


def test_nothing_from_the_data_can_end_a_script_or_reach_the_network(page):
    text = page.html
    # The only ends of script elements are those of the page's three; the names are escaped.
    assert len(re.findall("</script", text, re.I)) == 3 and EVIL not in text and "<!--" not in text
    meta, _ = page_data(text)
    assert meta["classNames"]["0"] == f"{EVIL} 0"
    policy = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', text)[1]
    assert policy.startswith("default-src 'none';") and "connect-src" not in policy and "http" not in policy
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+';", policy) and "unsafe" not in policy


def test_a_notebook_shows_the_page_in_a_sandboxed_frame(page):
    frame = page._repr_html_()
    assert frame.startswith("<iframe ") and 'sandbox="allow-scripts allow-downloads"' in frame
    assert html.unescape(re.search(r'srcdoc="([^"]*)"', frame)[1]) == page.html


def test_explore_command_writes_the_page_and_refuses_a_missing_image(model, images, tmp_path, capsys):
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(checkpoint, model, class_names=CLASS_NAMES, image_size=HEIGHT)
    files = []
    for index, pixels in enumerate(images):
        files.append(tmp_path / f"image{index}.png")
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(files[-1])
    out = tmp_path / "explore.html"
    assert main(["explore", str(checkpoint), *map(str, files), "--out", str(out), "--device", "cpu"]) == 0
    assert f"{out}: where the model looks in 2 image(s)" in capsys.readouterr().out
    meta, _ = page_data(out.read_text())
    assert [image["name"] for image in meta["images"]] == ["image0.png", "image1.png"]
    before = out.read_text()
    assert main(["explore", str(checkpoint), str(tmp_path / "missing.jpg"), "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "missing.jpg: cannot read image" in error
    assert out.read_text() == before


# ---- in a browser ----


@pytest.fixture(scope="module")
def browser(request):
    executable = find_chromium()
    if executable is None:
        message = "no Chromium found (apt-get install chromium)"
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(f"the explore page's browser tests must run in CI: {message}")
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"tests/test_explore.py: browser tests skipped, {message}")
        pytest.skip(message)
    with chromium(executable) as context:
        yield context


@dataclass
class Opened:
    """A page and what it did: console errors, uncaught exceptions, requests and dialogs."""

    page: object
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def drawn(self) -> dict:
        return self.page.evaluate("window.explore.drawn")

    def state(self) -> dict:
        return self.page.evaluate("window.explore.state")

    def canvas_point(self, x: float, y: float, canvas: str = "#picture") -> tuple[float, float]:
        """Viewport coordinates of image pixel (x, y) on ``canvas``."""
        bounds = self.page.locator(canvas).bounding_box()
        frame = self.drawn()["frame"]
        return bounds["x"] + x * bounds["width"] / frame["width"], bounds["y"] + y * bounds["height"] / frame["height"]


@pytest.fixture
def open_page(browser, page_file):
    """Opens the page (with a URL fragment); afterwards checks that it logged no error, raised
    nothing, opened no dialog and requested nothing but its own file."""
    opened_pages = []

    def opener(fragment: str = "", url: str | None = None) -> Opened:
        page = browser.new_page()
        opened = Opened(page)
        page.on("console", lambda message: message.type == "error" and opened.errors.append(message.text))
        page.on("pageerror", lambda error: opened.errors.append(str(error)))
        page.on("request", lambda request: opened.requests.append(request.url))
        page.on("dialog", lambda dialog: (opened.dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(url or page_file.as_uri() + fragment)
        page.wait_for_function("window.explore && window.explore.drawn !== null")
        opened_pages.append(opened)
        return opened

    yield opener
    for opened in opened_pages:
        opened.page.close()
        assert opened.errors == [] and opened.dialogs == []
        assert {url.split("#")[0] for url in opened.requests} <= {page_file.as_uri()}


def test_the_page_opens_without_errors_and_its_policy_blocks_requests(open_page, model):
    opened = open_page()
    # It opens on the last encoder layer.
    assert opened.drawn()["view"] == "encoder" and opened.state()["encoderLayer"] == model.config.encoder_layers - 1
    violated = opened.page.evaluate("""() => new Promise((resolve) => {
        document.addEventListener("securitypolicyviolation", (event) => resolve(event.effectiveDirective));
        fetch("http://127.0.0.1:9/").catch(() => {});
    })""")
    assert violated == "connect-src"
    opened.errors.clear()  # the browser reports the refused request on the console


def test_hovering_draws_the_query_sampling_points_where_the_model_put_them(open_page, detector, images):
    opened = open_page("#opacity=1")
    config = detector.model.config
    record = captured(detector, images[0])[0][encoder(config.encoder_layers - 1)]
    (height, width), *_ = record.spatial_shapes.tolist()
    row, column = 5, 9
    opened.page.mouse.move(*opened.canvas_point((column + 0.7) * WIDTH / width, (row + 0.2) * HEIGHT / height))
    drawn = opened.drawn()
    query = row * width + column
    assert drawn["queries"] == [query]
    assert drawn["references"] == [{"query": query, "x": pytest.approx((column + 0.5) * WIDTH / width),
                                    "y": pytest.approx((row + 0.5) * HEIGHT / height)}]  # fmt: skip
    points = drawn["points"]
    assert len(points) == config.num_heads * config.num_feature_levels * config.encoder_points
    by_index = {(p["head"], p["level"], p["point"]): p for p in points}
    expected = record.sampling_locations[0, query].clamp(-0.5, 1.5) * torch.tensor([WIDTH, HEIGHT])
    for (head, level, point), p in by_index.items():
        assert p["x"] == pytest.approx(float(expected[head, level, point, 0]), abs=COORDINATES.step * WIDTH)
        assert p["y"] == pytest.approx(float(expected[head, level, point, 1]), abs=COORDINATES.step * HEIGHT)
        assert p["weight"] == pytest.approx(float(record.attention_weights[0, query, head, level, point]), abs=WEIGHTS.step)
    # A dot well clear of the others is its head's colour at its centre.
    scale = drawn["scale"]
    radius = {key: max(1.0, 24 * p["weight"] ** 0.5) / scale for key, p in by_index.items()}
    clear = [key for key, p in by_index.items() if radius[key] * scale >= 3 and 0 < p["x"] < WIDTH and 0 < p["y"] < HEIGHT
             and all(np.hypot(p["x"] - q["x"], p["y"] - q["y"]) > radius[key] + radius[other] + 2 / scale
                     for other, q in by_index.items() if other != key)]  # fmt: skip
    assert clear
    head, _, _ = clear[0]
    x, y = by_index[clear[0]]["x"] * scale, by_index[clear[0]]["y"] * scale
    colour = opened.page.evaluate(
        f"Array.from(document.getElementById('picture').getContext('2d').getImageData({x} * devicePixelRatio, {y} * devicePixelRatio, 1, 1).data)"
    )
    assert tuple(colour[:3]) == head_colours(config.num_heads)[head]


def test_clicking_a_detection_and_moving_the_layer_slider_follows_the_references(open_page, detector, images):
    records, outputs, _, _ = captured(detector, images[0])
    # A threshold halfway between the fifth and the sixth best query.
    scores = outputs["pred_logits"][0].sigmoid().max(-1).values.sort(descending=True).values
    threshold = float(scores[4] + scores[5]) / 2
    opened = open_page(f"#view=decoder&threshold={threshold}")
    detections = [box for box in opened.drawn()["boxes"] if box["kind"] == "detection"]
    assert len(detections) == 5 and all(box["score"] >= threshold for box in detections)
    # The smallest detection under its own centre is the one a click there picks.
    areas = {d["query"]: (d["box"][2] - d["box"][0]) * (d["box"][3] - d["box"][1]) for d in detections}
    target = next(d for d in sorted(detections, key=lambda d: areas[d["query"]]))
    x1, y1, x2, y2 = target["box"]
    opened.page.mouse.click(*opened.canvas_point((x1 + x2) / 2, (y1 + y2) / 2))
    query = target["query"]
    assert opened.state()["query"] == query

    slider = opened.page.locator("#decoder-layer")
    slider.focus()
    opened.page.keyboard.press("Home")
    references, predictions = [], []
    layers = detector.model.config.decoder_layers
    for layer in range(layers):
        drawn = opened.drawn()
        assert opened.state()["decoderLayer"] == layer + 1
        expected = box_convert(records[decoder(layer)].reference_points[0, query, 0], "cxcywh", "xyxy")
        expected = expected * torch.tensor([WIDTH, HEIGHT, WIDTH, HEIGHT])
        (reference,) = drawn["references"]
        assert reference["box"] == pytest.approx(expected.tolist(), abs=COORDINATES.step * WIDTH * 2)
        references.append(reference["box"])
        prediction = next(box for box in drawn["boxes"] if box["kind"] == "prediction")
        layer_outputs = [*outputs["aux_outputs"], outputs][layer]
        box = box_convert(layer_outputs["pred_boxes"][0, query], "cxcywh", "xyxy") * torch.tensor([WIDTH, HEIGHT] * 2)
        assert prediction["box"] == pytest.approx(box.tolist(), abs=COORDINATES.step * WIDTH * 2)
        predictions.append(prediction["box"])
        assert len(drawn["points"]) == 8 * 4 * 4
        opened.page.keyboard.press("ArrowRight")
    # The model refines the box layer by layer, and the drawing follows: each layer starts from the box before.
    assert len({tuple(np.round(r, 3)) for r in references}) == layers
    for reference, previous in zip(references[1:], predictions[:-1]):
        assert reference == pytest.approx(previous, abs=COORDINATES.step * WIDTH * 2)


def test_any_query_from_the_list_and_the_encoder_proposals(open_page, detector, images):
    opened = open_page("#view=decoder&threshold=1")
    assert [box for box in opened.drawn()["boxes"] if box["kind"] == "detection"] == []
    opened.page.select_option("#query", "7")
    drawn = opened.drawn()
    assert drawn["queries"] == [7] and len(drawn["points"]) == 8 * 4 * 4
    opened.page.check("#proposals")
    opened.page.fill("#proposal-count", "5")
    opened.page.press("#proposal-count", "Enter")
    proposals = [box for box in opened.drawn()["boxes"] if box["kind"] == "proposal"]
    _, outputs, _, _ = captured(detector, images[0])
    logits = outputs["enc_outputs"]["pred_logits"][0, :, 0]
    top = logits.topk(5).indices
    boxes = box_convert(outputs["enc_outputs"]["pred_boxes"][0, top], "cxcywh", "xyxy") * torch.tensor([WIDTH, HEIGHT] * 2)
    torch.testing.assert_close(torch.tensor([p["box"] for p in proposals]), boxes, rtol=0, atol=COORDINATES.step * WIDTH * 2)
    assert [p["score"] for p in proposals] == pytest.approx(logits[top].sigmoid().tolist(), abs=SCORES.step)


def test_a_malicious_class_name_shows_as_text_and_runs_nothing(open_page):
    opened = open_page("#view=decoder&threshold=0")
    page = opened.page
    opened.page.select_option("#query", "3")
    labels = page.locator("#query option").all_text_contents()
    assert sum(EVIL in label for label in labels) == len(labels) - 1  # every query but "none"
    assert EVIL in page.locator("#info").text_content()
    # No element came from a name: the page's own only, and no image element at all.
    assert page.evaluate("document.images.length") == 0
    assert page.evaluate("document.querySelectorAll('script').length") == 3
    # Teardown: no dialog opened, nothing requested.


def test_the_url_fragment_reopens_the_same_view(open_page):
    opened = open_page()
    page = opened.page
    page.mouse.click(*opened.canvas_point(20, 20))
    page.mouse.click(*opened.canvas_point(100, 70))
    page.locator("#heads input").nth(3).uncheck()
    page.select_option("#query-level", "1")
    first = opened.drawn()
    assert len(first["queries"]) == 2 and all(p["head"] != 3 for p in first["points"])
    again = open_page(url=page.url)
    assert again.state() == opened.state()
    assert again.drawn() == first

    opened.page.locator('#views button[data-view="decoder"]').click()
    opened.page.select_option("#query", "11")
    opened.page.locator("#decoder-layer").focus()
    opened.page.keyboard.press("ArrowLeft")
    again = open_page(url=opened.page.url)
    assert again.state()["decoderLayer"] == 2 and again.state()["query"] == 11
    assert again.drawn() == opened.drawn()


def test_save_png_downloads_the_current_view(open_page):
    opened = open_page("#view=heat")
    with opened.page.expect_download() as download:
        opened.page.click("#save")
    assert download.value.suggested_filename == "explore-heat.png"
    picture = Image.open(io.BytesIO(open(download.value.path(), "rb").read()))
    canvas = opened.page.evaluate("[document.getElementById('picture').width, document.getElementById('picture').height]")
    assert picture.format == "PNG" and picture.width > canvas[0] and picture.height > canvas[1]


def test_the_image_picker_and_the_heat_map(open_page, page, detector, images):
    opened = open_page("#view=heat")
    opened.page.select_option("#image", "1")
    drawn = opened.drawn()
    assert drawn["image"] == 1 and drawn["frame"] == {"width": 90, "height": 120}
    meta, data = page_data(page.html)
    image = meta["images"][1]
    layer = detector.model.config.encoder_layers - 1
    heat = embedded(image, data, f"encoder.{layer}.heat").astype(np.float64).reshape(8, -1) * image["heatMaxima"][0] / 65535
    sizes = [h * w for h, w in image["shapes"]]
    totals = [part.sum() for part in np.split(heat.sum(0), np.cumsum(sizes)[:-1])]
    assert drawn["heat"]["totals"] == pytest.approx(totals, rel=1e-4)


def test_the_notebook_frame_runs_the_page_in_its_sandbox(browser, page, tmp_path):
    host = tmp_path / "notebook.html"
    host.write_text(f"<!DOCTYPE html><html><body><p>a notebook cell</p>{page._repr_html_()}</body></html>")
    tab = browser.new_page()
    errors = []
    tab.on("console", lambda message: message.type == "error" and errors.append(message.text))
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.goto(host.as_uri())
    frame = tab.frames[1]
    frame.wait_for_function("window.explore && window.explore.drawn !== null")
    # Its script is its own: the notebook's window has no explore object, and the frame cannot reach the notebook.
    assert tab.evaluate("typeof window.explore") == "undefined"
    assert frame.evaluate("(() => { try { return window.parent.document.title; } catch { return 'refused'; } })()") == "refused"
    # The picture's place in the notebook's viewport, once the frame has laid it out.
    box = frame.locator("#picture").bounding_box()
    tab.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    frame.wait_for_function("window.explore.drawn.points.length > 0")
    assert len(frame.evaluate("window.explore.drawn.points")) == 8 * 4 * 4
    tab.close()
    assert errors == []


def test_a_subsampled_page_wraps_its_captions_to_the_level_panels(browser, detector, images, page, tmp_path):
    """The first level's caption says which queries are kept; it wraps within its panel, where it
    widened that panel's column and left the picture the less room."""
    smaller = explore(detector, images, max_bytes=page.size - 1).save(tmp_path / "subsampled.html")
    tab = browser.new_page()
    tab.goto(smaller.as_uri())
    tab.wait_for_function("window.explore && window.explore.drawn !== null")
    assert "queries kept" in tab.locator("figcaption").first.text_content()
    widths = tab.evaluate("""[...document.querySelectorAll("#panels figure")].map((figure) =>
        [figure.querySelector("canvas"), figure.querySelector("figcaption")].map((e) => e.getBoundingClientRect().width))""")
    tab.close()
    assert all(caption == pytest.approx(canvas) for canvas, caption in widths)


def test_on_a_laptop_screen_the_picture_and_panels_leave_the_info_lines_in_view(browser, page_file):
    """The picture and the level panels fit the window's height below the controls with room for
    the three lines that say what the mouse points at; at 1366 x 768 those lines were below the
    window's edge (the picture took the height less a fixed 230 pixels, the panels took no notice)."""
    tab = browser.new_page()
    tab.set_viewport_size({"width": 1366, "height": 768})
    line = None
    for image in (0, 1):  # a landscape picture, and a portrait one whose panels are the taller
        tab.goto(page_file.as_uri() + f"#view=decoder&image={image}")  # the tallest controls
        tab.wait_for_function(f"window.explore && window.explore.drawn && window.explore.drawn.image === {image}")
        line = line or tab.evaluate("parseFloat(getComputedStyle(document.getElementById('info')).lineHeight)")
        assert tab.locator("#info").bounding_box()["y"] + 3 * line <= 768, image
    tab.close()


def test_box_labels_stay_on_the_picture(open_page):
    """A label starts at its box's left edge, moved left where it would run off the picture's right
    edge: the score of a detection at the image's right was cut off."""
    opened = open_page("#view=decoder&threshold=0&query=0")
    drawn = opened.drawn()
    width = drawn["frame"]["width"] * drawn["scale"]
    labels = [(box["box"][0] * drawn["scale"], box["label"]) for box in drawn["boxes"]]
    assert any(left + label["width"] > width for left, label in labels)  # some would have run off
    assert all(0 <= label["x"] and label["x"] + label["width"] <= width + 1e-6 for _, label in labels)
