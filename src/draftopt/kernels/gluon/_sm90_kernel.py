"""Device code of the Hopper (sm_90) block-sparse attention kernel, written in Gluon.

Same contract as the Triton kernel (triton/attention.py) on tile-major q, k, v
or, in place, on the original token order at batch 1: a visual query tile
attends to its selected key tiles and to every text block; a text query block
attends to every block; ``key_bias`` is added to text keys always and to visual
keys when ``VISUAL_BIAS``; with ``EDGE`` (a padded grid without a key mask) an edge
tile's padding keys are masked by their position in the tile instead, so visual
keys read no bias. For 16-bit inputs, head dim 64 or 128, 128-token blocks.
FlashAttention-3's schedule, written by hand:

- one producer warp issues every TMA load (q once; K and V into rings of
  buffers, each with a "ready" barrier the copy engine completes and an "empty"
  barrier both consumers arrive on when their wgmma has read it);
- two consumer warpgroups, 64 query rows each, run on their own: no CTA-wide
  barrier ties them, and they take turns issuing their products (an mbarrier
  pair, "ping-pong"), so one warpgroup's softmax runs under the other's
  matrix products;
- within a consumer, the wgmma of S_j = Q K_j^T and of O += P_{j-1} V_{j-1} are
  issued back to back and the softmax of S_j runs while the second one does;
- P stays in registers as the A operand of the second wgmma; the output goes
  back through shared memory and a TMA store;
- text query blocks (they attend to every key block) launch first, and each
  program starts its key list at the point the programs beside it have
  reached, so concurrent programs share K / V blocks in L2;
- ``FP8=True`` (``precision="fp8"``): the same schedule on tile-major e4m3 q, k
  and V^T (triton/quantize.py makes them) with FP8 wgmma; the scales fold into
  the softmax scale and the epilogue, P (times 256, in the exponent) stays in
  registers with its keys in V^T's order (``fp8_key_order``), and the 16-bit
  output has a buffer of its own.

Why each of these, with the numbers: docs/design.md ("Hopper: why a Gluon kernel").
Launchers and the op-facing functions: attention.py beside this file.
"""

from __future__ import annotations

try:  # Gluon ships with Triton >= 3.5; without it the Triton kernel runs (dispatch.py logs why).
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # Triton 3.6 names (newer releases renamed them async_load / async_store).
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    IMPORT_ERROR: ImportError | None = None
except ImportError as e:  # pragma: no cover - depends on the Triton build
    IMPORT_ERROR = e

HAVE_GLUON = IMPORT_ERROR is None

# FP8: P is scaled by this before its e4m3 cast, so that its small entries stay normal numbers (e4m3's
# smallest normal is 2**-6: unscaled, entries below ~2**-9 of their row's maximum would round to 0).
# The kernel adds its log2 to the exponent (exp2(x + 8) = 256 * exp2(x)): no multiply per score.
FP8_P_SCALE_LOG2 = 8
FP8_P_SCALE = 2.0 ** FP8_P_SCALE_LOG2

if HAVE_GLUON:

    @gluon.jit
    def _key_row(idx_row, j, j0, cnt, n_vis, is_text, n_tiles, bh_row0, BLOCK: gl.constexpr):
        """(first row of key block j in the [B*heads*Lp, D] view, block index): visual tiles (the selected ones,
        or all for a text query block) from position j0 of their list on, wrapping around; then text."""
        jr = j + j0
        jr = gl.where(jr >= n_vis, jr - n_vis, jr)
        sel = gl.load(idx_row + gl.maximum(gl.minimum(jr, cnt - 1), 0))
        kb = gl.where(is_text, jr, sel)
        kb = gl.where(j < n_vis, kb, n_tiles + (j - n_vis))
        return bh_row0 + kb * BLOCK, kb

    @gluon.jit
    def _bias_block(idx_row, j, j0, cnt, n_vis, is_text, n_tiles, NEED_INDEX: gl.constexpr):
        """Block index of key j where the consumer needs it (its bias row, or with EDGE its padding). Keys
        j >= n_vis are text in every query tile, so without either no index load sits on the softmax's
        critical path (a dependent global load per key block otherwise: docs/design.md)."""
        if NEED_INDEX:
            kb = _key_row(idx_row, j, j0, cnt, n_vis, is_text, n_tiles, 0, 1)[1]
        else:
            kb = n_tiles + (j - n_vis)
        return kb

    @gluon.jit
    def _issue(desc, buf, bar, row, pred):
        mbarrier.expect(bar, desc.block_type.nbytes, pred=pred)
        _tma_load(desc, [row, 0], bar, buf, pred=pred)

    @gluon.jit
    def _as_block_36(buf, desc):
        return buf._reinterpret(desc.dtype, desc.block_type.shape, desc.layout)

    @gluon.jit
    def _as_block_new(buf, desc):
        return buf.reinterpret(desc.dtype, desc.block_type.shape, desc.layout)

    # ``buf`` viewed with a descriptor's block shape and layout (same bytes; Triton 3.6 spells it _reinterpret).
    _as_block = _as_block_36 if hasattr(gl.shared_memory_descriptor, "_reinterpret") else _as_block_new

    @gluon.jit
    def _box(kb, nw, nhw, sub, TILE_H: gl.constexpr, BLOCK: gl.constexpr, box):
        """Coordinates [t, row, col] of visual tile kb's box (sub-box ``sub`` of a split tile) in [T, H, W].
        A tile splits in two row halves, or, one row high (a raster strip), in two column halves."""
        TILE_W: gl.constexpr = BLOCK // TILE_H
        BOX_H: gl.constexpr = box.block_type.shape[2]
        BOX_W: gl.constexpr = box.block_type.shape[3]
        row = ((kb % nhw) // nw) * TILE_H
        col = (kb % nw) * TILE_W
        if BOX_H < TILE_H:
            row = row + sub * BOX_H
        else:
            col = col + sub * BOX_W
        return kb // nhw, row, col

    @gluon.jit
    def _load_block(tm, box, txt, buf, bar, kb, row_tm, h, n_tiles, nw, nhw, sub,
                    BLOCK: gl.constexpr, TILE_H: gl.constexpr, IN_PLACE: gl.constexpr):
        """TMA-load block kb (or its half ``sub``) into ``buf`` [rows, D]. From the tile-major copy at row
        ``row_tm``, or in place: a visual tile as a box of the [heads, T, H, W, D] view, a text block as rows
        of [heads, L_text, D]. Rows outside the tensor (edge tiles, the text's end) arrive as zeros."""
        if IN_PLACE:
            if kb < n_tiles:
                t, a, c = _box(kb, nw, nhw, sub, TILE_H, BLOCK, box)
                mbarrier.expect(bar, box.block_type.nbytes)
                _tma_load(box, [h, t, a, c, 0], bar, _as_block(buf, box))
            else:
                mbarrier.expect(bar, txt.block_type.nbytes)
                _tma_load(txt, [h, (kb - n_tiles) * BLOCK + sub * txt.block_type.shape[1], 0], bar,
                          _as_block(buf, txt))
        else:
            _issue(tm, buf, bar, row_tm, True)

    @gluon.jit
    def _store_block(tm, box, txt, buf, kb, row_tm, h, n_tiles, nw, nhw, sub,
                     BLOCK: gl.constexpr, TILE_H: gl.constexpr, IN_PLACE: gl.constexpr):
        """TMA-store ``buf`` as half ``sub`` of query block kb (the mirror of ``_load_block``; clipped at the edges)."""
        if IN_PLACE:
            if kb < n_tiles:
                t, a, c = _box(kb, nw, nhw, sub, TILE_H, BLOCK, box)
                _tma_store(box, [h, t, a, c, 0], _as_block(buf, box))
            else:
                _tma_store(txt, [h, (kb - n_tiles) * BLOCK + sub * txt.block_type.shape[1], 0],
                           _as_block(buf, txt))
        else:
            _tma_store(tm, [row_tm, 0], buf)

    P_SCALE_LOG2 = gl.constexpr(float(FP8_P_SCALE_LOG2))

    @gluon.jit
    def _softmax(s, m_i, bias_ptr, qk_scale, APPLY_BIAS: gl.constexpr, BLOCK: gl.constexpr,
                 s_layout: gl.constexpr, P_LOG2: gl.constexpr):
        """One key block into the running softmax (log2 units): (P, m_new, alpha). P is 2**P_LOG2 times the
        softmax's numerator (FP8's P scale, folded into the exponent: no multiply per score); the consumer
        adds its row sums (or, with ROWSUM_MMA, a product does)."""
        if APPLY_BIAS:
            offs = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, s_layout))
            bias = gl.load(bias_ptr + offs) * 1.4426950408889634
            s = s * qk_scale + bias[None, :]
            m_new = gl.maximum(m_i, gl.max(s, axis=1))
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no live key yet
            p = gl.exp2(s - (m_safe - P_LOG2)[:, None])
            alpha = gl.exp2(m_i - m_safe)
        else:
            m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
            p = gl.exp2(s * qk_scale - (m_new - P_LOG2)[:, None])
            alpha = gl.exp2(m_i - m_new)
        return p, m_new, alpha

    @gluon.jit
    def _valid_extent(kb, EDGE: gl.constexpr, E_NW: gl.constexpr, E_NHW: gl.constexpr, E_NH: gl.constexpr,
                      E_ROWS: gl.constexpr, E_COLS: gl.constexpr, TH: gl.constexpr, BLOCK: gl.constexpr):
        """(rows, columns) of real tokens in visual tile kb of a padded grid: the tile's own unless it is in
        the last tile row (E_ROWS rows) or column (E_COLS columns). The grid is constexpr (E_NW tiles per
        tile row, E_NHW per frame, E_NH tile rows), so the divisions are multiply-shifts; a runtime
        divisor costs a reciprocal chain on the softmax's path. Without EDGE: the whole tile."""
        TW: gl.constexpr = BLOCK // TH
        vr = kb * 0 + TH
        vc = kb * 0 + TW
        if EDGE:
            vr = gl.where((kb % E_NHW) // E_NW == E_NH - 1, E_ROWS, TH)
            vc = gl.where(kb % E_NW == E_NW - 1, E_COLS, TW)
        return vr, vc

    @gluon.jit
    def _padding_masked(s, vr, vc, TH: gl.constexpr, BLOCK: gl.constexpr, s_layout: gl.constexpr):
        """S with -inf on the keys outside a tile's first vr rows and vc columns (box order: a key's
        position in its tile is row * TW + column); S itself, with no work, for a whole tile."""
        TW: gl.constexpr = BLOCK // TH
        if (vr < TH) | (vc < TW):
            offs = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, s_layout))
            ok = ((offs // TW) < vr) & ((offs % TW) < vc)
            s = gl.where(ok[None, :], s, float("-inf"))
        return s

    @gluon.jit
    def _key_softmax(s, m_i, j, kb, vr, vc, n_vis, bias_bh, qk_scale, VISUAL_BIAS: gl.constexpr,
                     EDGE: gl.constexpr, EDGE_TH: gl.constexpr, BLOCK: gl.constexpr, s_layout: gl.constexpr,
                     FP8: gl.constexpr):
        """Key block j (block kb) into the running softmax. Text keys (j >= n_vis), and every key with
        VISUAL_BIAS, add their bias row; with EDGE, visual keys mask their tile's padding by position
        (``_valid_extent``: no bias load); other visual keys add nothing."""
        P_LOG2: gl.constexpr = P_SCALE_LOG2 if FP8 else 0.0
        if (j >= n_vis) | VISUAL_BIAS:
            p, m_i, alpha = _softmax(s, m_i, bias_bh + kb * BLOCK, qk_scale, True, BLOCK, s_layout, P_LOG2)
        else:
            if EDGE:
                s = _padding_masked(s, vr, vc, EDGE_TH, BLOCK, s_layout)
            p, m_i, alpha = _softmax(s, m_i, bias_bh, qk_scale, False, BLOCK, s_layout, P_LOG2)
        return p, m_i, alpha

    @gluon.jit
    def _p_operand(p, dtype: gl.constexpr, p_layout: gl.constexpr, FP8: gl.constexpr):
        """P (float32, S's layout) in the layout of the PV product's register A operand. 16-bit: cast, and
        the same registers. FP8: still float32 (``_a_operand`` casts it where the product is issued), its
        keys reordered so that no value changes thread (``fp8_key_order``: the copy of V^T is in the same
        order)."""
        if FP8:
            ROWS: gl.constexpr = p.shape[0]
            BLOCK: gl.constexpr = p.shape[1]
            # Key 16g + 8h + 2t + e (t: the thread in its quad) of the accumulator goes to 16g + 4t + 2h + e:
            # a thread's own 4 keys, adjacent as the 8-bit operand's 32-bit registers hold them.
            p = gl.reshape(p, [ROWS, BLOCK // 16, 2, 4, 2]).permute((0, 1, 3, 2, 4))
            op = gl.convert_layout(gl.reshape(p, [ROWS, BLOCK]), p_layout)
        else:
            op = gl.convert_layout(p.to(dtype), p_layout)
        return op

    @gluon.jit
    def _a_operand(p_op, FP8: gl.constexpr):
        """The PV product's A operand from ``_p_operand``'s: FP8 casts 4 keys to one 32-bit register (two
        cvt and a byte permute) right before the product, in the block that issues it. Cast at the end of the
        previous iteration, the 8-bit values crossed the loop as 16-bit registers, unpacked and repacked:
        200 more instructions a key block (benchmarks/sm90_sass.py). Casting here also keeps 8-bit
        registers out of the wgmma wait, which Triton 3.6 rejects ("Unexpected bitwidth in
        WGMMAWaitGroupOp: 8")."""
        if FP8:
            p_op = gl.inline_asm_elementwise(
                "{ .reg .b16 lo, hi;\n"
                "cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;\n"
                "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;\n"
                "mov.b32 $0, {lo, hi}; }",
                "=r,r,r,r,r", [p_op], dtype=gl.float8e4nv, is_pure=True, pack=4)
        return p_op

    @gluon.jit
    def _v_operand(v_smem, vs, FP8: gl.constexpr):
        """V buffer ``vs`` as the [BLOCK, D] B operand: FP8 wgmma reads B K-major, so FP8 buffers hold V^T."""
        buf = v_smem.index(vs)
        if FP8:  # one return: Gluon checks every return's type, even under a constexpr branch
            buf = buf.permute((1, 0))
        return buf

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, qv_desc, kv_desc, vv_desc, qt_desc, kt_desc, vt_desc,
                  q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                  idx_row, j0, cnt, n_vis, n_total, is_text, n_tiles, bh_row0, q_row, pid_m, h, nw, nhw, bh,
                  K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, TILE_H: gl.constexpr, IN_PLACE: gl.constexpr,
                  FP8: gl.constexpr):
        BLOCK: gl.constexpr = k_desc.block_type.shape[0]
        ROWS: gl.constexpr = q_desc.block_type.shape[0]
        for c in gl.static_range(2):  # the two halves of the query block, one per consumer
            _load_block(q_desc, qv_desc, qt_desc, q_smem.index(c), q_bar, pid_m, q_row + c * ROWS, h, n_tiles,
                        nw, nhw, c, BLOCK, TILE_H, IN_PLACE)
        for j in range(n_total):
            kr, kb = _key_row(idx_row, j, j0, cnt, n_vis, is_text, n_tiles, bh_row0, BLOCK)
            ks = j % K_STAGES
            mbarrier.wait(k_empty.index(ks), ((j // K_STAGES) & 1) ^ 1)  # passes at once on a fresh buffer
            _load_block(k_desc, kv_desc, kt_desc, k_smem.index(ks), k_ready.index(ks), kb, kr, h, n_tiles, nw, nhw,
                        0, BLOCK, TILE_H, IN_PLACE)
            vs = j % V_STAGES
            mbarrier.wait(v_empty.index(vs), ((j // V_STAGES) & 1) ^ 1)
            if FP8:  # V^T [B*heads*D, Lp]: block kb is the columns of its tokens
                mbarrier.expect(v_ready.index(vs), v_desc.block_type.nbytes)
                _tma_load(v_desc, [bh * v_desc.block_type.shape[0], kb * BLOCK], v_ready.index(vs), v_smem.index(vs))
            else:
                _load_block(v_desc, vv_desc, vt_desc, v_smem.index(vs), v_ready.index(vs), kb, kr, h, n_tiles, nw,
                            nhw, 0, BLOCK, TILE_H, IN_PLACE)

    @gluon.jit
    def _column(sums, row_layout: gl.constexpr):
        """One column of P @ ones (its 8 columns are equal) as a row vector in ``row_layout``."""
        return gl.convert_layout(gl.max(sums, axis=1), row_layout)

    @gluon.jit
    def _consumer(c: gl.constexpr, o_desc, ov_desc, ot_desc, q_smem, o_smem, k_smem, v_smem, ones_smem,
                  q_bar, k_ready, k_empty, v_ready, v_empty, turn,
                  bias_bh, idx_row, j0, cnt, n_vis, n_total, is_text, n_tiles, q_row, qk_scale, v_scale, pid_m, h,
                  nw, nhw, VISUAL_BIAS: gl.constexpr, K_STAGES: gl.constexpr, V_STAGES: gl.constexpr,
                  TILE_H: gl.constexpr, STORE_IN_PLACE: gl.constexpr, PINGPONG: gl.constexpr, FP8: gl.constexpr,
                  EDGE: gl.constexpr, EDGE_TH: gl.constexpr, E_NW: gl.constexpr, E_NHW: gl.constexpr,
                  E_NH: gl.constexpr, E_ROWS: gl.constexpr, E_COLS: gl.constexpr, ROWSUM_MMA: gl.constexpr):
        ROWS: gl.constexpr = o_desc.block_type.shape[0]
        HEAD_D: gl.constexpr = o_desc.block_type.shape[1]
        BLOCK: gl.constexpr = k_smem.shape[1]
        dtype: gl.constexpr = k_smem.dtype  # the operands' type (e4m3 for FP8); the output is o_desc's
        # wgmma takes 32 bytes of K per instruction: 16 elements of 16 bits, 32 of 8 bits.
        K_INSTR: gl.constexpr = 32 if FP8 else 16
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK, K_INSTR])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_D, K_INSTR])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=K_INSTR // 8)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        # ROWSUM_MMA: P's row sums as a product P @ ones [BLOCK, 8] issued beside P V (8 equal columns: the
        # narrowest wgmma), instead of 64 FADDs a thread after each softmax. Each block's product starts
        # from zero and l adds it in float32: FP8 wgmma accumulates with about 14 bits aligned to the
        # accumulator, so a running sum (all terms positive, ~100 blocks) lost each small P to truncation
        # and came out 25% low at HunyuanVideo 720p 0.9 (docs/design.md).
        l_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, 8, K_INSTR])
        pl_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=l_layout, k_width=K_INSTR // 8)
        PENDING_AFTER_S: gl.constexpr = 2 if ROWSUM_MMA else 1  # wgmma groups issued after S_j
        q_mine = q_smem.index(c)
        ones = ones_smem.permute((1, 0))

        m_i = gl.full([ROWS], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([ROWS], gl.float32, row_s)
        acc = gl.zeros([ROWS, HEAD_D], gl.float32, o_layout)
        l_zero = gl.zeros([ROWS, 8], gl.float32, l_layout)
        s_zero = gl.zeros([ROWS, BLOCK], gl.float32, s_layout)

        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q_mine, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False)
        mbarrier.arrive(k_empty.index(0))
        kb = _bias_block(idx_row, 0, j0, cnt, n_vis, is_text, n_tiles, VISUAL_BIAS | EDGE)
        vr, vc = _valid_extent(kb, EDGE, E_NW, E_NHW, E_NH, E_ROWS, E_COLS, EDGE_TH, BLOCK)
        p, m_i, alpha = _key_softmax(s, m_i, 0, kb, vr, vc, n_vis, bias_bh, qk_scale, VISUAL_BIAS, EDGE,
                                     EDGE_TH, BLOCK, s_layout, FP8)
        if not ROWSUM_MMA:
            l_i = l_i * alpha + gl.sum(p, axis=1)
        p_op = _p_operand(p, dtype, p_layout, FP8)

        for j in range(1, n_total):
            ks = j % K_STAGES
            vs = (j - 1) % V_STAGES
            # Issued before the waits: its latency hides under the products, not in the softmax.
            kb = _bias_block(idx_row, j, j0, cnt, n_vis, is_text, n_tiles, VISUAL_BIAS | EDGE)
            mbarrier.wait(k_ready.index(ks), (j // K_STAGES) & 1)
            if PINGPONG:  # take turns issuing the two products: one warpgroup's softmax runs under the other's
                mbarrier.wait(turn.index(c), (j + c) & 1, pred=j + c > 1)
            s_tok = warpgroup_mma(q_mine, k_smem.index(ks).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(vs), ((j - 1) // V_STAGES) & 1)
            a_op = _a_operand(p_op, FP8)
            acc_tok = warpgroup_mma(a_op, _v_operand(v_smem, vs, FP8), acc, is_async=True)
            if ROWSUM_MMA:
                l_tok = warpgroup_mma(gl.convert_layout(a_op, pl_layout), ones, l_zero, use_acc=False,
                                      is_async=True)
            if PINGPONG:
                mbarrier.arrive(turn.index(1 - c))
            # While both products run: the padding extent of key tile kb (its index load has landed).
            vr, vc = _valid_extent(kb, EDGE, E_NW, E_NHW, E_NH, E_ROWS, E_COLS, EDGE_TH, BLOCK)
            s = warpgroup_mma_wait(PENDING_AFTER_S, deps=(s_tok,))
            mbarrier.arrive(k_empty.index(ks))
            # Softmax of S_j while the tensor cores run P_{j-1} V_{j-1}.
            p, m_i, alpha = _key_softmax(s, m_i, j, kb, vr, vc, n_vis, bias_bh, qk_scale, VISUAL_BIAS,
                                         EDGE, EDGE_TH, BLOCK, s_layout, FP8)
            if ROWSUM_MMA:
                if FP8:
                    acc, l_blk = warpgroup_mma_wait(0, deps=(acc_tok, l_tok))
                else:
                    acc, l_blk, p_op = warpgroup_mma_wait(0, deps=(acc_tok, l_tok, p_op))
                l_i = (l_i + _column(l_blk, row_s)) * alpha  # P_{j-1}'s sums, then m_{j-1} -> m_j
            else:
                l_i = l_i * alpha + gl.sum(p, axis=1)
                if FP8:
                    acc = warpgroup_mma_wait(0, deps=(acc_tok,))
                else:
                    acc, p_op = warpgroup_mma_wait(0, deps=(acc_tok, p_op))
            mbarrier.arrive(v_empty.index(vs))
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            p_op = _p_operand(p, dtype, p_layout, FP8)

        vs = (n_total - 1) % V_STAGES
        mbarrier.wait(v_ready.index(vs), ((n_total - 1) // V_STAGES) & 1)
        a_op = _a_operand(p_op, FP8)
        acc = warpgroup_mma(a_op, _v_operand(v_smem, vs, FP8), acc)
        if ROWSUM_MMA:
            l_blk = warpgroup_mma(gl.convert_layout(a_op, pl_layout), ones, l_zero, use_acc=False)
            l_i = l_i + _column(l_blk, row_s)
        mbarrier.arrive(v_empty.index(vs))

        l_o = gl.convert_layout(l_i, row_o)
        l_o = gl.where(l_o == 0.0, 1.0, l_o)  # rows whose keys are all masked -> zeros
        o_mine = o_smem.index(c)  # q's buffer where the types match: these q rows are no longer read
        if FP8:
            o_mine.store((acc * (v_scale / l_o)[:, None]).to(o_desc.dtype))
        else:
            o_mine.store((acc / l_o[:, None]).to(o_desc.dtype))
        fence_async_shared()
        _store_block(o_desc, ov_desc, ot_desc, o_mine, pid_m, q_row + c * ROWS, h, n_tiles, nw, nhw, c,
                     BLOCK, TILE_H, STORE_IN_PLACE)
        tma.store_wait(0)

    @gluon.jit
    def _attend_sm90_kernel(
        q_desc, k_desc, v_desc, o_desc, qv_desc, kv_desc, vv_desc, ov_desc, qt_desc, kt_desc, vt_desc, ot_desc,
        Bias, KvIdx, KvCnt, QScale, KScale, VScale,
        stride_bb, stride_bh, stride_ib, stride_ih, stride_is, stride_cb, stride_ch,
        n_heads, n_bh, n_tiles, n_text_blocks, Lp, qk_scale, nw, nhw, n_sm,
        VISUAL_BIAS: gl.constexpr, K_STAGES: gl.constexpr, V_STAGES: gl.constexpr,
        TILE_H: gl.constexpr, IN_PLACE: gl.constexpr, PINGPONG: gl.constexpr, ROTATE: gl.constexpr,
        FP8: gl.constexpr, EDGE: gl.constexpr, EDGE_TH: gl.constexpr, E_NW: gl.constexpr, E_NHW: gl.constexpr,
        E_NH: gl.constexpr, E_ROWS: gl.constexpr, E_COLS: gl.constexpr, ROWSUM_MMA: gl.constexpr,
        STORE_IN_PLACE: gl.constexpr,
    ):
        # IN_PLACE (batch 1): q, k, v in the original order, read through the box (visual tiles) and row
        # (text) descriptors; else tile-major copies through q_desc ... v_desc. STORE_IN_PLACE (batch 1): the
        # output likewise, through ov_desc / ot_desc (o_desc gives its block type); else tile-major. FP8 reads
        # tile-major e4m3 copies and may store in place: no unpermute of its output.
        # FP8: tile-major e4m3 q, k and V^T (v_desc over [B*heads*D, Lp]) with float32 scales: QScale per
        # query block [B*heads, Lp / BLOCK], KScale and VScale per head [B*heads]; a 16-bit output.
        BLOCK: gl.constexpr = k_desc.block_type.shape[0]
        ROWS: gl.constexpr = q_desc.block_type.shape[0]  # query rows per consumer warpgroup
        HEAD_D: gl.constexpr = q_desc.block_type.shape[1]
        dtype: gl.constexpr = q_desc.dtype
        gl.static_assert(2 * ROWS == BLOCK)
        # One flat grid, heaviest programs first: text query blocks attend to every key block (many times
        # a visual tile's work at high sparsity); launched last they ran alone at the end
        # (docs/design.md, "Heavy text blocks first").
        pid = gl.program_id(0)
        n_heavy = n_bh * n_text_blocks
        is_heavy = pid < n_heavy
        rest = gl.maximum(pid - n_heavy, 0)
        pid_m = gl.where(is_heavy, n_tiles + pid % gl.maximum(n_text_blocks, 1), rest % n_tiles)
        bh = gl.where(is_heavy, pid // gl.maximum(n_text_blocks, 1), rest // n_tiles)
        b = bh // n_heads
        h = bh % n_heads
        bh_row0 = bh * Lp
        is_text = pid_m >= n_tiles
        row = gl.minimum(pid_m, n_tiles - 1)
        cnt = gl.load(KvCnt + b * stride_cb + h * stride_ch + row)
        n_vis = gl.where(is_text, n_tiles, cnt)
        n_total = n_vis + n_text_blocks
        idx_row = KvIdx + b * stride_ib + h * stride_ih + row * stride_is
        j0 = n_vis * 0
        if ROTATE:
            # Start each program's sweep over its (ascending) key list where the programs running beside it
            # are: the i-th of n_sm concurrent programs at i/n_sm of its list. All then read keys near the
            # same index at any moment, so a head's K and V (more than L2 at HunyuanVideo 720p) are
            # read from DRAM about once per wave instead of once per program that selected them.
            j0 = ((pid % n_sm) * n_vis) // n_sm
        bias_bh = Bias + b * stride_bb + h * stride_bh
        q_row = bh_row0 + pid_m * BLOCK
        v_scale = qk_scale * 0.0 + 1.0
        if FP8:  # dequantization folded into the softmax scale and the epilogue
            qk_scale = qk_scale * gl.load(QScale + bh * (Lp // BLOCK) + pid_m) * gl.load(KScale + bh)
            v_scale = gl.load(VScale + bh)  # P's scale is in l as well: acc / l cancels it

        q_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [K_STAGES, BLOCK, HEAD_D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [V_STAGES, v_desc.block_type.shape[0], v_desc.block_type.shape[1]],
                                           v_desc.layout)
        if FP8:  # a 16-bit output does not fit q's 8-bit buffer
            o_smem = gl.allocate_shared_memory(o_desc.dtype, [2, ROWS, HEAD_D], o_desc.layout)
        else:
            o_smem = q_smem
        ones_smem = gl.allocate_shared_memory(dtype, [8, BLOCK], k_desc.layout)  # B of the row sums (ROWSUM_MMA)
        if ROWSUM_MMA:
            fill: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
            if FP8:  # 1.0 as its e4m3 bits: Triton 3.6 turns a cast of the constant 1.0 into wrong bytes
                ones_smem.store(gl.full([8, BLOCK], 0x38, gl.int8, fill).to(dtype, bitcast=True))
            else:
                ones_smem.store(gl.full([8, BLOCK], 1.0, gl.float32, fill).to(dtype))
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=2)  # one expect-tx per half
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        for i in gl.static_range(K_STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)  # one arrival per consumer warpgroup
        for i in gl.static_range(V_STAGES):
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(v_empty.index(i), count=2)
        fence_async_shared()

        gl.warp_specialize([
            (_consumer, (0, o_desc, ov_desc, ot_desc, q_smem, o_smem, k_smem, v_smem, ones_smem, q_bar, k_ready, k_empty,
                         v_ready, v_empty, turn, bias_bh, idx_row, j0, cnt, n_vis, n_total, is_text, n_tiles, q_row,
                         qk_scale, v_scale, pid_m, h, nw, nhw, VISUAL_BIAS, K_STAGES, V_STAGES, TILE_H,
                         STORE_IN_PLACE, PINGPONG, FP8, EDGE, EDGE_TH, E_NW, E_NHW, E_NH, E_ROWS, E_COLS,
                         ROWSUM_MMA)),
            (_consumer, (1, o_desc, ov_desc, ot_desc, q_smem, o_smem, k_smem, v_smem, ones_smem, q_bar, k_ready, k_empty,
                         v_ready, v_empty, turn, bias_bh, idx_row, j0, cnt, n_vis, n_total, is_text, n_tiles, q_row,
                         qk_scale, v_scale, pid_m, h, nw, nhw, VISUAL_BIAS, K_STAGES, V_STAGES, TILE_H,
                         STORE_IN_PLACE, PINGPONG, FP8, EDGE, EDGE_TH, E_NW, E_NHW, E_NH, E_ROWS, E_COLS,
                         ROWSUM_MMA)),
            (_producer, (q_desc, k_desc, v_desc, qv_desc, kv_desc, vv_desc, qt_desc, kt_desc, vt_desc,
                         q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                         idx_row, j0, cnt, n_vis, n_total, is_text, n_tiles, bh_row0, q_row, pid_m, h, nw, nhw, bh,
                         K_STAGES, V_STAGES, TILE_H, IN_PLACE, FP8)),
        ], [4, 1], [232, 24])  # consumer 1: 4 warps, 232 registers; producer: 1 warp, 24
