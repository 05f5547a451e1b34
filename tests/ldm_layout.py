"""Key names and shapes of LDM-format checkpoints (openaimodel UNet + camera MLP, the SD VAE), generated
from the architectures' hyper-parameters, for synthetic checkpoints in tests. At the sd21 settings the
UNet part reproduces MVDream's key list (tests/data/mvdream-sd21-unet-keys.json) exactly."""
from __future__ import annotations

UNET = "model.diffusion_model."
VAE = "first_stage_model."


def _resblock(p: str, cin: int, cout: int, temb: int) -> dict:
    k = {f"{p}.in_layers.0.weight": [cin], f"{p}.in_layers.0.bias": [cin],
         f"{p}.in_layers.2.weight": [cout, cin, 3, 3], f"{p}.in_layers.2.bias": [cout],
         f"{p}.emb_layers.1.weight": [cout, temb], f"{p}.emb_layers.1.bias": [cout],
         f"{p}.out_layers.0.weight": [cout], f"{p}.out_layers.0.bias": [cout],
         f"{p}.out_layers.3.weight": [cout, cout, 3, 3], f"{p}.out_layers.3.bias": [cout]}
    if cin != cout:
        k.update({f"{p}.skip_connection.weight": [cout, cin, 1, 1], f"{p}.skip_connection.bias": [cout]})
    return k


def _transformer(p: str, ch: int, ctx: int) -> dict:
    t = f"{p}.transformer_blocks.0"
    k = {f"{p}.norm.weight": [ch], f"{p}.norm.bias": [ch], f"{p}.proj_in.weight": [ch, ch], f"{p}.proj_in.bias": [ch],
         f"{p}.proj_out.weight": [ch, ch], f"{p}.proj_out.bias": [ch],
         f"{t}.ff.net.0.proj.weight": [ch * 8, ch], f"{t}.ff.net.0.proj.bias": [ch * 8],
         f"{t}.ff.net.2.weight": [ch, ch * 4], f"{t}.ff.net.2.bias": [ch]}
    for attn, kv in (("attn1", ch), ("attn2", ctx)):
        k.update({f"{t}.{attn}.to_q.weight": [ch, ch], f"{t}.{attn}.to_k.weight": [ch, kv],
                  f"{t}.{attn}.to_v.weight": [ch, kv], f"{t}.{attn}.to_out.0.weight": [ch, ch],
                  f"{t}.{attn}.to_out.0.bias": [ch]})
    for n in (1, 2, 3):
        k.update({f"{t}.norm{n}.weight": [ch], f"{t}.norm{n}.bias": [ch]})
    return k


def unet_keys(in_ch=4, out_ch=4, mc=320, mult=(1, 2, 4, 4), res_blocks=2, attention_levels=(0, 1, 2), ctx=1024,
              camera_dim=16) -> dict[str, list[int]]:
    temb = mc * 4
    k = {"time_embed.0.weight": [temb, mc], "time_embed.0.bias": [temb], "time_embed.2.weight": [temb, temb],
         "time_embed.2.bias": [temb], "camera_embed.0.weight": [temb, camera_dim], "camera_embed.0.bias": [temb],
         "camera_embed.2.weight": [temb, temb], "camera_embed.2.bias": [temb],
         "input_blocks.0.0.weight": [mc, in_ch, 3, 3], "input_blocks.0.0.bias": [mc]}
    chans, ch, b = [mc], mc, 1
    for level, m in enumerate(mult):
        for _ in range(res_blocks):
            k.update(_resblock(f"input_blocks.{b}.0", ch, m * mc, temb))
            ch = m * mc
            if level in attention_levels:
                k.update(_transformer(f"input_blocks.{b}.1", ch, ctx))
            chans.append(ch)
            b += 1
        if level != len(mult) - 1:
            k.update({f"input_blocks.{b}.0.op.weight": [ch, ch, 3, 3], f"input_blocks.{b}.0.op.bias": [ch]})
            chans.append(ch)
            b += 1
    k.update(_resblock("middle_block.0", ch, ch, temb))
    k.update(_transformer("middle_block.1", ch, ctx))
    k.update(_resblock("middle_block.2", ch, ch, temb))
    b = 0
    for level, m in reversed(list(enumerate(mult))):
        for i in range(res_blocks + 1):
            k.update(_resblock(f"output_blocks.{b}.0", ch + chans.pop(), m * mc, temb))
            ch = m * mc
            sub = 1
            if level in attention_levels:
                k.update(_transformer(f"output_blocks.{b}.1", ch, ctx))
                sub = 2
            if level and i == res_blocks:
                k.update({f"output_blocks.{b}.{sub}.conv.weight": [ch, ch, 3, 3], f"output_blocks.{b}.{sub}.conv.bias": [ch]})
            b += 1
    k.update({"out.0.weight": [mc], "out.0.bias": [mc], "out.2.weight": [out_ch, mc, 3, 3], "out.2.bias": [out_ch]})
    return {UNET + name: shape for name, shape in k.items()}


def _vae_res(p: str, cin: int, cout: int) -> dict:
    k = {f"{p}.norm1.weight": [cin], f"{p}.norm1.bias": [cin], f"{p}.conv1.weight": [cout, cin, 3, 3], f"{p}.conv1.bias": [cout],
         f"{p}.norm2.weight": [cout], f"{p}.norm2.bias": [cout], f"{p}.conv2.weight": [cout, cout, 3, 3], f"{p}.conv2.bias": [cout]}
    if cin != cout:
        k.update({f"{p}.nin_shortcut.weight": [cout, cin, 1, 1], f"{p}.nin_shortcut.bias": [cout]})
    return k


def _vae_attn(p: str, ch: int) -> dict:
    k = {f"{p}.norm.weight": [ch], f"{p}.norm.bias": [ch]}
    for n in ("q", "k", "v", "proj_out"):
        k.update({f"{p}.{n}.weight": [ch, ch, 1, 1], f"{p}.{n}.bias": [ch]})
    return k


def vae_keys(ch=128, mult=(1, 2, 4, 4), res_blocks=2, z=4, embed_dim=4) -> dict[str, list[int]]:
    k = {"encoder.conv_in.weight": [ch, 3, 3, 3], "encoder.conv_in.bias": [ch]}
    cur = ch
    for i, m in enumerate(mult):
        for j in range(res_blocks):
            k.update(_vae_res(f"encoder.down.{i}.block.{j}", cur, ch * m))
            cur = ch * m
        if i != len(mult) - 1:
            k.update({f"encoder.down.{i}.downsample.conv.weight": [cur, cur, 3, 3], f"encoder.down.{i}.downsample.conv.bias": [cur]})
    for part in ("encoder", "decoder"):
        c = ch * mult[-1]
        k.update(_vae_res(f"{part}.mid.block_1", c, c))
        k.update(_vae_attn(f"{part}.mid.attn_1", c))
        k.update(_vae_res(f"{part}.mid.block_2", c, c))
    k.update({"encoder.norm_out.weight": [cur], "encoder.norm_out.bias": [cur],
              "encoder.conv_out.weight": [2 * z, cur, 3, 3], "encoder.conv_out.bias": [2 * z],
              "quant_conv.weight": [2 * embed_dim, 2 * z, 1, 1], "quant_conv.bias": [2 * embed_dim],
              "post_quant_conv.weight": [z, embed_dim, 1, 1], "post_quant_conv.bias": [z],
              "decoder.conv_in.weight": [ch * mult[-1], z, 3, 3], "decoder.conv_in.bias": [ch * mult[-1]]})
    cur = ch * mult[-1]
    for i in reversed(range(len(mult))):
        for j in range(res_blocks + 1):
            k.update(_vae_res(f"decoder.up.{i}.block.{j}", cur, ch * mult[i]))
            cur = ch * mult[i]
        if i != 0:
            k.update({f"decoder.up.{i}.upsample.conv.weight": [cur, cur, 3, 3], f"decoder.up.{i}.upsample.conv.bias": [cur]})
    k.update({"decoder.norm_out.weight": [cur], "decoder.norm_out.bias": [cur],
              "decoder.conv_out.weight": [3, cur, 3, 3], "decoder.conv_out.bias": [3]})
    return {VAE + name: shape for name, shape in k.items()}
