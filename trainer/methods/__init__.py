"""The training methods, one module each: its config, time sampling, pair construction and the loss callable a stage
hands to `trainer.loop.train_loop` (`loss_fn(model, batch, step) -> [B]`).

- `cmt`: Consistency Mid-Training's CM and MF objectives (trainer/mid.py), and the preconditioning transfer before them;
- `ect`: ECT and ECD, the Ψ_{t→0} post-training objectives (trainer/post.py);
- `meanflow`: MeanFlow, the Ψ_{t→s} post-training objective (trainer/post.py);
- `per_step`: the per-step glue they share (step seeds, one dropout mask per pair, the attention kernel, the tests'
  fault-injection hooks).

The per-sample maths (distances, ECT / MeanFlow / CMT losses, total derivatives) stays in `trainer/losses.py`.

Time arguments: every call of a flow map or a loss passes its times by keyword, in one order, `t` (the start time)
before `r` (the end time, r ≤ t). Each method works in one view (`pipeline/time_convention.py`): ECT, ECD and CMT's CM
form in the EDM view, where t = σ̃ (x̃ = x0 + σ̃·ε); MeanFlow and CMT's MF form in the flow-matching view, where t = τ
(z = (1 − τ)·x0 + τ·ε). Each module names the batch keys it reads.
"""
