"""The MQAR sweep's training step replayed from CUDA graphs (mqar.TrainStep) against the same
step run eagerly: the same kernels, so the same losses and weights bit for bit, over every
length of a sweep's cycle (one graph each, one memory pool), a learning rate that changes
every step, and batches whose answer counts differ (the padded answer rows)."""
import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("mixer", ["single", "mom", "hybrid"])
def test_graphed_steps_equal_eager_steps(megatron_single, mixer):
    from megatron_mom.apps import mqar, mqar_sweep
    from megatron_mom.layer import metrics
    torch.backends.cuda.matmul.allow_tf32 = True
    s = mqar_sweep.settings_for("zoology", {"seq_lens": [64, 128], "tokens_per_step": 2048})
    ms = mqar_sweep.model_settings(s, width=64, lr=1e-3, steps=12)
    dev = torch.device("cuda")
    metrics.set_router_loss_scale(device=dev)
    runs = {}
    for graphs in (False, True):
        mqar_sweep._seed_everything(0)   # torch's and Megatron's CUDA generators: same init
        model = mqar.build_model(mixer, ms, dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1,
                                betas=(0.9, 0.98), fused=True, capturable=True)
        step = mqar.TrainStep(model, opt, graphs=graphs)
        gen = torch.Generator(device=dev).manual_seed(1)
        pick = torch.Generator().manual_seed(2)
        exclude = torch.zeros(0, dtype=torch.long, device=dev)
        losses = []
        for i in range(12):              # 6 steps per length: 2 eager, the capture, 3 replays
            x, y, _ = mqar_sweep.training_batch(s, i, gen, pick, exclude, dev)
            loss = step(x, y, mqar._lr(i, ms), mqar_sweep.max_answers(x.shape[1], s))
            losses.append(loss.item())
        assert step.graphs == graphs and len(step._graphs) == (2 if graphs else 0)
        runs[graphs] = (losses, [p.detach().clone() for p in model.parameters()])
    (eager, w_eager), (graphed, w_graphed) = runs[False], runs[True]
    assert all(torch.isfinite(torch.tensor(eager)))
    assert graphed == eager
    for a, b in zip(w_eager, w_graphed):
        assert torch.equal(a, b)
    assert w_eager[0].abs().sum() > 0


def test_graphed_step_needs_a_capturable_optimizer(megatron_single):
    from megatron_mom.apps import mqar
    model = torch.nn.Linear(4, 4).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="capturable=True"):
        mqar.TrainStep(model, opt, graphs=True)
