"""The attacker's encoder: LoRA matrices (and the fine-tuning step) -> a prompt-shaped embedding.

weights-attack.md §6. One 1-D conv tokenizer per LoRA matrix turns the matrix (rank as channels,
width as length) into one token; a learned task token and an embedding of the fine-tuning step r
go in front; a frozen text transformer (the base model's own text-encoder layers, fed embeddings
directly, no positions, no causal mask) mixes them; the first L tokens go through mean and
log-variance heads, so z has the shape of a prompt embedding (L, D_ctx) and the victim's own
UNet can be conditioned on it. The mean is centred on real prompt embeddings and scaled by their
spread [D], so an untrained encoder already outputs an average prompt.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

INITIAL_LOGVAR = -6.0  # [D] initial sampling std exp(-3) ~ 0.05 prompt std
MatrixShapes = list[tuple[int, int]]  # (rank, length) of each encoder input, in canonical order


@dataclass(frozen=True)
class EncoderConfig:
    """Sizes of the encoder, read from the victim's file and the base model.

    Attributes:
        matrix_shapes: (r, d) of every input matrix (A as r x d_in, B^T as r x d_out), in order.
        context_length: L, the text context length of the base model.
        context_dim: D_ctx, the UNet's cross-attention width.
        hidden: H, the width of the frozen transformer.
        conv_channels: width of the tokenizers' hidden conv stages [D].
        kl_weight: beta_KL (0 in the reference code).
    """

    matrix_shapes: tuple[tuple[int, int], ...]
    context_length: int
    context_dim: int
    hidden: int
    conv_channels: int = 32
    kl_weight: float = 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "matrix_shapes": [list(s) for s in self.matrix_shapes]}

    @classmethod
    def from_dict(cls, raw: dict) -> "EncoderConfig":
        return cls(**{**raw, "matrix_shapes": tuple(tuple(s) for s in raw["matrix_shapes"])})


class TokenizerGroup(nn.Module):
    """The tokenizers of `count` same-shaped LoRA matrices: (B, count, r, d) -> (B, count, H).

    Each matrix has its own tokenizer (nothing is shared); they run as one grouped convolution
    for speed. A tokenizer is four blocks of two (instance norm -> conv k3) stages with a
    LeakyReLU between any two stages; the last conv has one channel and a tanh; then
    Linear(d -> H). Instance norm removes each channel's scale: the step token carries it.
    (Instance norm of each channel = GroupNorm with one group per channel.)
    """

    def __init__(self, count: int, rank: int, length: int, hidden: int, channels: int) -> None:
        super().__init__()
        self.count = count
        widths = [rank] + [channels] * 7 + [1]
        stages: list[nn.Module] = []
        for i in range(8):  # 4 blocks x 2 stages
            if i > 0:
                stages.append(nn.LeakyReLU(0.2))
            stages += [nn.GroupNorm(count * widths[i], count * widths[i]),
                       nn.Conv1d(count * widths[i], count * widths[i + 1], 3, padding=1, groups=count)]
        self.convs = nn.Sequential(*stages)
        self.project_weight = nn.Parameter(torch.randn(count, length, hidden) / length ** 0.5)
        self.project_bias = nn.Parameter(torch.zeros(count, hidden))

    def forward(self, matrices: torch.Tensor) -> torch.Tensor:
        batch, count, rank, length = matrices.shape
        signal = torch.tanh(self.convs(matrices.reshape(batch, count * rank, length)))  # (B, count, d)
        return torch.einsum("bkd,kdh->bkh", signal, self.project_weight) + self.project_bias


class WeightEncoder(nn.Module):
    """Enc(inputs, r) -> (mu, logvar), each (B, L, D_ctx).

    Args:
        config: the encoder's sizes.
        text_transformer: the base model's CLIP text encoder; its transformer layers and final
            layer norm are copied and frozen (the victim's pipeline is left untouched).
    """

    def __init__(self, config: EncoderConfig, text_transformer: nn.Module) -> None:
        super().__init__()
        self.config = config
        h = config.hidden
        # Matrices grouped by shape, each group's tokenizers run together; `order` restores the file order.
        shapes = sorted(set(config.matrix_shapes))
        self.groups = [[i for i, s in enumerate(config.matrix_shapes) if s == shape] for shape in shapes]
        self.tokenizers = nn.ModuleList(TokenizerGroup(len(members), r, d, h, config.conv_channels)
                                        for members, (r, d) in zip(self.groups, shapes))
        self.order = [pos for members in self.groups for pos in members]
        self.task_token = nn.Parameter(torch.randn(h) * 0.02)
        missing = config.context_length - (len(config.matrix_shapes) + 2)
        self.pad_tokens = nn.Parameter(torch.randn(missing, h) * 0.02) if missing > 0 else None
        self.step_sinusoid = Timesteps(h, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.step_mlp = TimestepEmbedding(h, h)  # Linear -> SiLU -> Linear
        self.input_norm = nn.LayerNorm(h)
        text_hidden = text_transformer.config.hidden_size
        self.to_text = nn.Identity() if text_hidden == h else nn.Linear(h, text_hidden)
        self.backbone = copy.deepcopy(text_transformer.encoder).requires_grad_(False)
        self.backbone_norm = copy.deepcopy(text_transformer.final_layer_norm).requires_grad_(False)
        self.mean_head = nn.Linear(text_hidden, config.context_dim)
        self.logvar_head = nn.Linear(text_hidden, config.context_dim)
        # z starts near-deterministic: with beta_KL = 0 a unit initial variance only drowns the
        # signal of the first thousands of updates (sigma 1 is as large as the prompts' own spread).
        nn.init.constant_(self.logvar_head.bias, INITIAL_LOGVAR)
        # Heads speak in units of real prompt embeddings: mu = mean + std * head (see set_context_prior).
        self.register_buffer("context_mean", torch.zeros(config.context_length, config.context_dim))
        self.register_buffer("context_scale", torch.ones(config.context_length, config.context_dim))

    def set_context_prior(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Centres the output on real prompt embeddings (per-dimension mean and std, each (L, D_ctx)).

        At initialisation z is then an average prompt, which the victim's UNet reads like one, and
        the heads learn only the identity-specific deviation, in units of the prompts' own spread.
        """
        self.context_mean.copy_(mean)
        self.context_scale.copy_(std.clamp_min(1e-3))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, inputs: list[torch.Tensor], step: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encodes a batch of LoRA files.

        Args:
            inputs: one (B, r, d) tensor per matrix, in the order of `config.matrix_shapes`.
            step: (B,) fine-tuning steps r, or None for the no-step-token ablation (the slot
                then holds a learned constant: the same sequence length either way).

        Returns:
            (mu, logvar), each (B, L, D_ctx).
        """
        if len(inputs) != len(self.config.matrix_shapes):
            raise ValueError(f"the encoder has {len(self.config.matrix_shapes)} tokenizers, got {len(inputs)} matrices")
        batch = inputs[0].shape[0]
        grouped = torch.cat([tok(torch.stack([inputs[i] for i in members], dim=1))
                             for tok, members in zip(self.tokenizers, self.groups)], dim=1)
        tokens = torch.empty_like(grouped)
        tokens[:, self.order] = grouped  # (B, M, H) in file order
        if step is None:
            step_token = self.step_mlp(torch.zeros(batch, self.config.hidden, device=tokens.device))
        else:
            sinusoid = self.step_sinusoid(step.to(tokens.device).float())
            step_token = self.step_mlp(sinusoid.to(tokens.dtype))
        sequence = [self.task_token.expand(batch, 1, -1), step_token[:, None], tokens]
        if self.pad_tokens is not None:
            sequence.append(self.pad_tokens.expand(batch, -1, -1))
        hidden = self.to_text(self.input_norm(torch.cat(sequence, dim=1)))
        # No position embedding and no causal mask: the tokens are an unordered-ish set of matrices.
        hidden = self.backbone(inputs_embeds=hidden, attention_mask=None).last_hidden_state
        hidden = self.backbone_norm(hidden)[:, : self.config.context_length]
        mu = self.context_mean + self.context_scale * self.mean_head(hidden)
        return mu, self.logvar_head(hidden)

    def standardized(self, mu: torch.Tensor) -> torch.Tensor:
        """mu in units of the prompt prior ((mu - mean) / std): what the KL term is measured in."""
        return (mu - self.context_mean) / self.context_scale

    def sample(self, mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + self.context_scale * torch.exp(0.5 * logvar) * noise


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), averaged over elements."""
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).mean()


def encoder_loss(noise_pred: torch.Tensor, noise: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                 kl_weight: float, align_target: torch.Tensor | None = None,
                 align_weight: float = 0.0, standardized_mu: torch.Tensor | None = None) -> torch.Tensor:
    """L_enc = mse(UNet(x_tau, tau, z), n) [+ lambda_align mse(z, text) + beta_KL KL] (weights-attack.md §5).

    With both weights 0 the extra terms are not even computed, so the loss is the noise-prediction
    MSE exactly (§11.4). The KL is taken in prompt-prior units when `standardized_mu` is given
    (`WeightEncoder.standardized`), else on mu itself.
    """
    loss = F.mse_loss(noise_pred, noise)
    if kl_weight:
        loss = loss + kl_weight * kl_divergence(mu if standardized_mu is None else standardized_mu, logvar)
    if align_weight and align_target is not None:
        loss = loss + align_weight * F.mse_loss(mu, align_target.expand_as(mu))
    return loss
