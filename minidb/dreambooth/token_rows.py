"""The text encoder's token embedding trained on the rows the run's prompts use, not the whole table.

A DreamBooth run's prompts are fixed before its first step (the instance prompt or the captions, and the
class prompt), and they use a few dozen of CLIP's 49,408 token rows. Dense AdamW gives every other row a
zero gradient, so that row's two moments stay zero and its whole update is the decoupled weight decay,
w *= 1 - lr * weight_decay. TokenRows trains the used rows as a parameter of their own and applies that
decay to the table itself after each step: the weights of dense training, to rounding (the gradient norm
sums in another order), without the table's gradient and two moments, which a dense step holds at the
end of every backward (three times the table: benchmarks/RESULTS.md, issue #31).

Where the equality is exact by construction it is used (minidb.dreambooth.plan, `token_rows`): torch's
AdamW (8-bit moments are quantized per block of the tensor, so a smaller tensor quantizes otherwise), no
EMA (the average of the untouched rows would need the table twice) and no fused backward step (which
steps each parameter on its own). An fp16/bf16 model keeps an fp32 copy of the table, as its fp32 master
weights would: a decay of lr * weight_decay is far below a 16-bit weight's resolution.
"""
import torch
import torch.nn.functional as F
from torch import nn

from minidb.errors import StateError

TOKEN_EMBEDDING = "text_encoder.text_model.embeddings.token_embedding"  # its trained name, without .weight


class TokenRows(nn.Module):
    """Takes the place of an nn.Embedding; `weight` stays the table (the checkpoint's key), frozen,
    and `rows` [k, width] are the trained rows of the token ids `ids` (sorted). `master` is the table
    in fp32: `weight` itself in an fp32 model, else a copy that `weight` is rounded from."""

    def __init__(self, embedding: nn.Embedding, token_ids: torch.Tensor):
        super().__init__()
        self.weight = embedding.weight
        self.weight.requires_grad_(False)
        device = self.weight.device
        self.ids = token_ids.flatten().unique().to(device)  # sorted; plain tensors, not buffers: DDP would
        self.slot = torch.full((self.weight.shape[0],), -1, dtype=torch.long, device=device)  # broadcast them
        self.slot[self.ids] = torch.arange(len(self.ids), device=device)  # token id -> its row in `rows`, or -1
        self.rows = nn.Parameter(self.weight.detach()[self.ids].clone())
        w = self.weight.detach()
        self.master = w if w.dtype == torch.float32 else w.float()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.rows.requires_grad):
            return F.embedding(input_ids, self.weight)  # sampling: the table holds the rows after each step
        slot = self.slot[input_ids]
        if bool((slot < 0).any()):  # its gradient would be lost: a bug, not a user's error
            raise RuntimeError("TokenRows: a token outside the run's prompts reached the trained text encoder")
        return F.embedding(slot, self.rows)  # [B, N, width], as the table's rows would be

    @torch.no_grad()
    def after_step(self, lr: float, weight_decay: float, rows: torch.Tensor) -> None:
        """What dense AdamW did to the rows without a gradient, then the stepped rows (fp32: the
        optimizer's, the masters of a 16-bit model) into the table."""
        self.master.mul_(1.0 - lr * weight_decay)
        self.master[self.ids] = rows
        if self.master is not self.weight:
            self.weight.copy_(self.master)  # rounded, as MasterWeights.copy_to_model rounds

    def state_dict_for_training(self) -> dict:
        """For the training state: the fp32 table (decayed since the base) and which rows train."""
        return {"ids": self.ids.cpu(), "table": self.master}

    @torch.no_grad()
    def load_training_state(self, state: dict) -> None:
        if not torch.equal(state["ids"], self.ids.cpu()):
            raise StateError("the training state trained other token rows: the prompts (or caption files) "
                             "changed since it was written; resume with the prompts it was trained with")
        self.master.copy_(state["table"])
        if self.master is not self.weight:
            self.weight.copy_(self.master)


def use_token_rows(text_encoder: nn.Module, token_ids: torch.Tensor) -> TokenRows:
    """Put a TokenRows in place of text_encoder's token embedding (after its requires_grad is set)."""
    embeddings = text_encoder.text_model.embeddings
    embeddings.token_embedding = TokenRows(embeddings.token_embedding, token_ids)
    return embeddings.token_embedding


def token_rows_of(text_encoder: nn.Module) -> TokenRows | None:
    """The TokenRows use_token_rows put in, or None."""
    module = text_encoder.text_model.embeddings.token_embedding
    return module if isinstance(module, TokenRows) else None


def dense_weights(weights: dict, rows: TokenRows) -> dict:
    """The trained weights by name (fp32) with the table, under its checkpoint key, in place of the rows."""
    out = {k: v for k, v in weights.items() if k != f"{TOKEN_EMBEDDING}.rows"}
    out[f"{TOKEN_EMBEDDING}.weight"] = rows.master
    return out
