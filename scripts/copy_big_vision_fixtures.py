#!/usr/bin/env python3
"""Copies the official-code reference fixtures (big_vision ViT, vmoe V-MoE) into kiln model
folders under tests/fixtures/big_vision: params.npz + config.json ({"model_name", "model"})
beside the reference tensors. Source: the shared fixture set made with the official JAX code
(see its README); run from the repository root. Standard library only."""
import json, os, shutil, sys

SRC = sys.argv[1] if len(sys.argv) > 1 else "/work/shared/fixtures"
DST = "tests/fixtures/big_vision"


def folder(name, model_name, kwargs, files):
    d = os.path.join(DST, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"model_name": model_name, "model": kwargs}, f, indent=1, sort_keys=True)
        f.write("\n")
    for src, dst in files:
        shutil.copyfile(os.path.join(SRC, src), os.path.join(d, dst))


vit = json.load(open(os.path.join(SRC, "vit_big_vision/config.json")))["variants"]
ml = vit["map_learn"]["model_kwargs"]
folder("vit_map_learn", "vit", ml, [("vit_big_vision/map_learn.params.npz", "params.npz"),
                                     ("vit_big_vision/map_learn.reference.safetensors", "reference.safetensors")])
folder("vit_map_learn_scan", "vit", dict(ml, scan=True), [("vit_big_vision/map_learn.params_scan.npz", "params.npz")])
folder("vit_tok_sincos2d", "vit", vit["tok_sincos2d"]["model_kwargs"],
       [("vit_big_vision/tok_sincos2d.params.npz", "params.npz"),
        ("vit_big_vision/tok_sincos2d.reference.safetensors", "reference.safetensors"),
        ("vit_big_vision/tok_sincos2d_24x32.reference.safetensors", "reference_24x32.safetensors")])

variants = ["k1_cap1.0_nobpr", "k2_cap0.75_bpr", "k2_cap4.0_nodrop"]
d = os.path.join(DST, "vmoe")
os.makedirs(d, exist_ok=True)
shutil.copyfile(os.path.join(SRC, "vmoe/params.npz"), os.path.join(d, "params.npz"))
for v in variants:
    c = json.load(open(os.path.join(SRC, f"vmoe/config_{v}.json")))
    with open(os.path.join(d, f"config_{v}.json"), "w") as f:
        json.dump({"model_name": "vmoe", "model": c["model_kwargs"]}, f, indent=1, sort_keys=True)
        f.write("\n")
    # What the official run dropped and kept, per block and group (the tests check these).
    with open(os.path.join(d, f"dropping_{v}.json"), "w") as f:
        json.dump({"capacity": c["capacity"], "dropping": c["dropping"]}, f, indent=1, sort_keys=True)
        f.write("\n")
    shutil.copyfile(os.path.join(SRC, f"vmoe/reference_{v}.safetensors"), os.path.join(d, f"reference_{v}.safetensors"))
# The folder itself is a model folder too (the BPR variant), with its images alone as
# `inputs.safetensors`, for the CLI (`kiln run ... --inputs inputs.safetensors --moe-stats`).
ref = os.path.join(d, "reference_k2_cap0.75_bpr.safetensors")
raw = open(ref, "rb").read()
n = int.from_bytes(raw[:8], "little")
entry = json.loads(raw[8:8 + n])["images"]
start, end = entry["data_offsets"]
data = raw[8 + n + start:8 + n + end]
hdr = json.dumps({"images": {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [0, len(data)]}}).encode()
hdr += b" " * ((8 - len(hdr) % 8) % 8)
with open(os.path.join(d, "inputs.safetensors"), "wb") as f:
    f.write(len(hdr).to_bytes(8, "little") + hdr + data)
shutil.copyfile(os.path.join(d, "config_k2_cap0.75_bpr.json"), os.path.join(d, "config.json"))

# PaliGemma's <seg> mask decoder: the released vae-oid.npz layout (PyTorch names), no kwargs.
seg = json.load(open(os.path.join(SRC, "paligemma_seg_decoder/config.json")))
kf = seg["kiln_folder_config"]
folder("paligemma_seg_decoder", kf["model_name"], kf["model"],
       [("paligemma_seg_decoder/params.npz", "params.npz"),
        ("paligemma_seg_decoder/reference.safetensors", "reference.safetensors")])

# The CapPa captioner (LocCa / LiT-decoder's encoder-decoder): images + text -> logits.
cap = json.load(open(os.path.join(SRC, "cappa_captioner/config.json")))
kf = cap["kiln_folder_config"]
folder("cappa_captioner", kf["model_name"], kf["model"],
       [("cappa_captioner/params.npz", "params.npz"),
        ("cappa_captioner/reference.safetensors", "reference.safetensors")])

# UViM's stage II VTT: images + codes (+1) -> logits; greedy code generation.
vtt = json.load(open(os.path.join(SRC, "uvim_vtt/config.json")))
kf = vtt["kiln_folder_config"]
folder("uvim_vtt", kf["model_name"], kf["model"],
       [("uvim_vtt/params.npz", "params.npz"), ("uvim_vtt/reference.safetensors", "reference.safetensors")])

# UViM's stage I VQ-VAE: the released npz layout (params/..., state/dictionary, state/counts).
vq = json.load(open(os.path.join(SRC, "uvim_vqvae/config.json")))
kf = vq["kiln_folder_config"]
folder("uvim_vqvae", kf["model_name"], kf["model"],
       [("uvim_vqvae/params.npz", "params.npz"), ("uvim_vqvae/reference.safetensors", "reference.safetensors")])

# big_vision's PaliGemma 1 and 2 (proj.paligemma.paligemma): the folder config the fixture set
# proposes (PALIGEMMA_BV.md §6), params.npz (keys under params/, f32, scan) and the references.
for case in ["paligemma_bv", "paligemma2_bv"]:
    c = json.load(open(os.path.join(SRC, case, "config.json")))["kiln_folder_config"]
    folder(case, c["model_name"], c["model"], [(f"{case}/params.npz", "params.npz"),
                                               (f"{case}/reference.safetensors", "reference.safetensors")])

# JetFormer: the trainer-config layout of JETFORMER.md section 6 (model, patch_pca, adaptor,
# latent_noise_dim) beside the official params.npz and reference tensors.
jf = json.load(open(os.path.join(SRC, "jetformer/config.json")))
d = os.path.join(DST, "jetformer")
os.makedirs(d, exist_ok=True)
with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(jf["kiln_config"], f, indent=1, sort_keys=True)
    f.write("\n")
for name in ["params.npz", "reference.safetensors"]:
    shutil.copyfile(os.path.join(SRC, "jetformer", name), os.path.join(d, name))
