"""The proxy MLP retrained from scratch after training (Luo-style, membership-audit.md §4.5)."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from privdiff.audit.attacks.base import Attack, ShadowSet, register_attack
from privdiff.audit.model import Candidates, Denoiser
from privdiff.audit.roc import auc
from privdiff.proxy import ProxyMLP, membership_margin
from privdiff.seeding import derive_seed, fixed_noise, generator, numpy_rng


def error_features(model: Denoiser, examples: Candidates, seed: int, purpose: str, draw: int) -> torch.Tensor:
    """(N, d) element-wise squared error at a random t and noise drawn per (seed, purpose, id, draw)."""
    shape = tuple(examples.latents.shape[1:])
    noise = torch.stack([fixed_noise(shape, seed, purpose, i, draw) for i in examples.ids])
    steps = torch.tensor([int(torch.randint(0, model.num_train_timesteps, (1,),
                                            generator=generator(seed, purpose, "t", i, draw)))
                          for i in examples.ids])
    noisy = model.scheduler.add_noise(examples.latents, noise, steps)
    return ((model.eps(noisy, steps, examples.contexts) - noise) ** 2).flatten(1)


@register_attack
class ProxyAttack(Attack):
    """MLP d -> 512 -> 256 -> 2 on fresh error features, early-stopped on 20 % of the aux split;
    score = member minus non-member logit averaged over R fixed draws."""

    name = "proxy"
    access = "gray+labels"
    draws = 8
    max_epochs = 150
    patience = 15
    learning_rate = 1e-3
    batch_size = 64

    def fit(self, model: Denoiser, aux_members: Candidates, aux_nonmembers: Candidates, *,
            shadows: ShadowSet | None = None) -> None:
        data = Candidates.join(aux_members, aux_nonmembers)
        labels = torch.tensor([1] * len(aux_members) + [0] * len(aux_nonmembers))
        rng = numpy_rng(self.seed, "proxy-split")
        val = np.concatenate([rng.permutation(np.flatnonzero(labels.numpy() == c))[:max(1, round(0.2 * n))]
                              for c, n in ((1, len(aux_members)), (0, len(aux_nonmembers)))])
        train = np.setdiff1d(np.arange(len(data)), val)
        val_data = data.take(val)
        val_features = [error_features(model, val_data, self.seed, "proxy-val", r) for r in range(self.draws)]
        torch.manual_seed(derive_seed(self.seed, "proxy-init") % 2**31)
        self.net = ProxyMLP(val_features[0].shape[1])
        optimiser = torch.optim.Adam(self.net.parameters(), lr=self.learning_rate, weight_decay=1e-4)
        shuffle = torch.Generator().manual_seed(derive_seed(self.seed, "proxy-shuffle"))
        best, best_state, waited, history = float("inf"), None, 0, []
        for epoch in range(self.max_epochs):
            self.net.train()
            features = error_features(model, data.take(train), self.seed, "proxy-train", epoch)
            order = torch.randperm(len(train), generator=shuffle)
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                loss = F.cross_entropy(self.net(features[idx]), labels[train][idx])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
            self.net.eval()
            with torch.no_grad():
                val_loss = float(np.mean([F.cross_entropy(self.net(f), labels[val]).item() for f in val_features]))
            history.append(val_loss)
            if val_loss < best - 1e-4:
                best, best_state, waited = val_loss, copy.deepcopy(self.net.state_dict()), 0
            else:
                waited += 1
                if waited >= self.patience:
                    break
        self.net.load_state_dict(best_state)
        self.net.eval()

        # Selection among attacks uses the held-out 20 % (in-sample aux AUC would flatter the MLP).
        val_auc = auc(self.score(model, val_data), labels[val].numpy())
        self.fitted = {"epochs": len(history), "best_val_ce": best, "n_train": len(train), "n_val": len(val),
                       "draws": self.draws, "aux_auc": val_auc, "aux_auc_on": "held-out 20 % of aux"}

    @torch.no_grad()
    def margins(self, model: Denoiser, examples: Candidates) -> np.ndarray:
        """(R, N) member margins, one row per fixed draw."""
        return np.stack([membership_margin(self.net(error_features(model, examples, self.seed, "proxy-score", r)))
                         .double().numpy() for r in range(self.draws)])

    def score(self, model: Denoiser, examples: Candidates) -> np.ndarray:
        return self.margins(model, examples).mean(axis=0)

    def queries_per_example(self) -> int:
        return self.draws
