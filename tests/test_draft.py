import torch

from angelmed.config import get_preset
from angelmed.draft import DraftConfig, DraftModel, draft_loss, target_features
from angelmed.model import Transformer


def _target():
    t = Transformer(get_preset("tiny")).init_weights(1).eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return t


def test_draft_training_loss_falls_and_agreement_rises():
    torch.manual_seed(0)
    target = _target()
    draft = DraftModel(DraftConfig.for_target(target.config)).init_weights(0)
    opt = torch.optim.AdamW(draft.parameters(), lr=3e-3)
    ids = torch.randint(0, 512, (8, 32))
    losses, accs = [], []
    for _ in range(25):
        loss, acc = draft_loss(draft, target, ids, steps=3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        accs.append(sum(acc) / len(acc))
    assert losses[-1] < 0.5 * losses[0]
    assert accs[-1] > accs[0] + 0.1
    assert all(p.grad is None for p in target.parameters())  # the target stays frozen


def test_target_features_are_the_chosen_layer_outputs():
    target = _target()
    ids = torch.randint(0, 512, (1, 6))
    feats, logits = target_features(target, ids, (0, 2))
    with torch.no_grad():
        ref = target(ids)
    torch.testing.assert_close(logits, ref.logits)
    assert len(feats) == 2 and feats[0].shape == (1, 6, 64)
    assert not torch.allclose(feats[0], feats[1])
    # the last layer's output, final-normed, gives the logits; layer 0's equals what a forward hook sees
    torch.testing.assert_close(target.logits_from_hidden(target.model.norm(feats[1])), ref.logits)
    seen = []
    hook = target.model.layers[0].register_forward_hook(lambda m, i, o: seen.append(o[0]))
    with torch.no_grad():
        target(ids)
    hook.remove()
    torch.testing.assert_close(feats[0], seen[0])


def test_save_load_roundtrip(tmp_path):
    target = _target()
    draft = DraftModel(DraftConfig.for_target(target.config)).init_weights(3)
    draft.save(tmp_path / "d")
    back = DraftModel.load(tmp_path / "d")
    for (n, a), (_, b) in zip(draft.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    assert back.draft_config.feature_layers == draft.draft_config.feature_layers
