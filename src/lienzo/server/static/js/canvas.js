// The image under edit: shown on one canvas, with a mask painted on a second canvas laid over it.
// Written by hand because the browser's canvas is all this needs; no drawing library is loaded.

const MASK_COLOUR = [124, 156, 255];

export class ImageEditor {
  constructor(wrap, imageCanvas, maskCanvas) {
    this.wrap = wrap;
    this.imageCanvas = imageCanvas;
    this.maskCanvas = maskCanvas;
    this.image = null;
    this.mode = "img2img";
    this.brush = 32;
    this.eraser = false;
    this.outpaint = { left: 0, right: 0, up: 0, down: 0 };
    this.onChange = () => {};
    this._bindPainting();
  }

  get hasImage() {
    return this.image !== null;
  }

  get size() {
    return this.image ? [this.image.naturalWidth || this.image.width, this.image.naturalHeight || this.image.height] : [0, 0];
  }

  setImage(image) {
    this.image = image;
    const [w, h] = this.size;
    this.maskCanvas.width = w;
    this.maskCanvas.height = h;
    this.render();
    this.onChange();
  }

  clearImage() {
    this.image = null;
    this.onChange();
  }

  setMode(mode) {
    this.mode = mode;
    this.render();
  }

  setOutpaint(amounts) {
    this.outpaint = amounts;
    this.render();
  }

  // Draw the picture; in outpaint mode, on a canvas grown by the margins to be filled.
  render() {
    if (!this.image) return;
    const [w, h] = this.size;
    const grow = this.mode === "outpaint" ? this.outpaint : { left: 0, right: 0, up: 0, down: 0 };
    const canvas = this.imageCanvas;
    canvas.width = w + grow.left + grow.right;
    canvas.height = h + grow.up + grow.down;
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(this.image, grow.left, grow.up, w, h);
    this.wrap.classList.toggle("outpaint", this.mode === "outpaint");
    this.maskCanvas.hidden = this.mode !== "inpaint";
  }

  // The input image as a PNG data URL, at its own size (outpaint margins are the server's job).
  imageDataURL() {
    const [w, h] = this.size;
    const canvas = document.createElement("canvas");
    canvas.width = w;
    canvas.height = h;
    canvas.getContext("2d").drawImage(this.image, 0, 0, w, h);
    return canvas.toDataURL("image/png");
  }

  // The mask as the API wants it: white = repaint, black = keep.
  maskDataURL() {
    const { width, height } = this.maskCanvas;
    const painted = this.maskCanvas.getContext("2d").getImageData(0, 0, width, height).data;
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const ctx = canvas.getContext("2d");
    const out = ctx.createImageData(width, height);
    for (let i = 0; i < painted.length; i += 4) {
      const v = painted[i + 3];
      out.data[i] = out.data[i + 1] = out.data[i + 2] = v;
      out.data[i + 3] = 255;
    }
    ctx.putImageData(out, 0, 0);
    return canvas.toDataURL("image/png");
  }

  maskIsEmpty() {
    const { width, height } = this.maskCanvas;
    if (!width || !height) return true;
    const data = this.maskCanvas.getContext("2d").getImageData(0, 0, width, height).data;
    for (let i = 3; i < data.length; i += 4) if (data[i] > 0) return false;
    return true;
  }

  clearMask() {
    this.maskCanvas.getContext("2d").clearRect(0, 0, this.maskCanvas.width, this.maskCanvas.height);
  }

  invertMask() {
    const { width, height } = this.maskCanvas;
    const ctx = this.maskCanvas.getContext("2d");
    const image = ctx.getImageData(0, 0, width, height);
    for (let i = 0; i < image.data.length; i += 4) {
      image.data[i] = MASK_COLOUR[0];
      image.data[i + 1] = MASK_COLOUR[1];
      image.data[i + 2] = MASK_COLOUR[2];
      image.data[i + 3] = 255 - image.data[i + 3];
    }
    ctx.putImageData(image, 0, 0);
  }

  _point(event) {
    const rect = this.maskCanvas.getBoundingClientRect();
    const scale = this.maskCanvas.width / rect.width;
    return { x: (event.clientX - rect.left) * scale, y: (event.clientY - rect.top) * scale };
  }

  _stroke(from, to) {
    const ctx = this.maskCanvas.getContext("2d");
    ctx.globalCompositeOperation = this.eraser ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = `rgb(${MASK_COLOUR.join(",")})`;
    ctx.lineWidth = this.brush;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
    ctx.beginPath();
    ctx.arc(to.x, to.y, this.brush / 2, 0, Math.PI * 2);
    ctx.fill();
  }

  _bindPainting() {
    let last = null;
    const canvas = this.maskCanvas;
    canvas.addEventListener("pointerdown", (event) => {
      if (this.mode !== "inpaint") return;
      canvas.setPointerCapture(event.pointerId);
      last = this._point(event);
      this._stroke(last, last);
      event.preventDefault();
    });
    canvas.addEventListener("pointermove", (event) => {
      if (!last) return;
      const next = this._point(event);
      this._stroke(last, next);
      last = next;
    });
    const end = () => {
      last = null;
    };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);
  }
}

export function loadImage(src) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("that file is not an image the browser can read"));
    image.src = src;
  });
}
