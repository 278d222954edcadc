"""Surrogate models: an exact GP on position and a deep-kernel GP on local scan patches.

Both are botorch ``SingleTaskGP`` models (exact gpytorch GPs, standardised outcomes), so
every botorch acquisition works on them unchanged. Inputs are rows of
``[patch features..., x, y]``: the coordinate GP looks only at the last two columns,
the DKL only at the patch part through a small network, so one candidate tensor serves
every model and a tip-travel penalty can always read the position.

Fitting uses torch Adam through botorch's ``fit_gpytorch_mll_torch`` and warm-starts
from the previous step's weights: a full L-BFGS refit of all network weights each step
is far too slow for a live experiment.
"""

from __future__ import annotations

from typing import Any

import torch
from botorch.models import SingleTaskGP
from botorch.models.transforms.outcome import Standardize
from botorch.optim.fit import fit_gpytorch_mll_torch
from botorch.optim.stopping import ExpMAStoppingCriterion
from gpytorch.distributions import MultivariateNormal
from gpytorch.kernels import MaternKernel, RBFKernel, ScaleKernel
from gpytorch.mlls import ExactMarginalLogLikelihood
from torch import Tensor, nn

DTYPE = torch.float64


class PatchEncoder(nn.Module):
    """Patch -> low-dimensional structure features (the DKL's learned metric).

    One small MLP is shared by every pixel of the patch (channels -> features) and the
    pixel features are pooled with learned spatial weights that start peaked on the
    centre: the property is measured at the centre, the surroundings (a nearby wall, a
    domain's size) modulate it. Sharing keeps the parameter count independent of the
    patch size, which matters with tens of training points.
    """

    def __init__(self, in_dim: int, channels: int, latent: int = 3, hidden: int = 32) -> None:
        super().__init__()
        if in_dim % channels:
            raise ValueError(f"patch: {in_dim} features are not {channels} channels of pixels")
        self.channels = channels
        self.pixels = in_dim // channels
        self.pixel_net = nn.Sequential(
            nn.Linear(channels, hidden), nn.Tanh(), nn.Linear(hidden, latent)
        )
        logits = torch.full((self.pixels,), -2.0)
        logits[self.pixels // 2] = 2.0
        self.spatial = nn.Parameter(logits)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        pix = x.reshape(-1, self.channels, self.pixels).transpose(1, 2)  # (B, P, C)
        z = self.pixel_net(pix)  # (B, P, latent)
        w = torch.softmax(self.spatial, 0).to(z.dtype)
        z = (z * w[None, :, None]).sum(1)
        return z.reshape(*lead, z.shape[-1])


class CoordinateGP(SingleTaskGP):
    """Exact GP (Matern 5/2, ARD) on the last two input columns: the position."""

    def __init__(self, train_x: Tensor, train_y: Tensor) -> None:
        super().__init__(
            train_x,
            train_y,
            covar_module=ScaleKernel(MaternKernel(nu=2.5, ard_num_dims=2)),
            outcome_transform=Standardize(m=1),
        )

    def forward(self, x: Tensor) -> MultivariateNormal:
        xy = x[..., -2:]
        return MultivariateNormal(self.mean_module(xy), self.covar_module(xy))

    def kernel(self, a: Tensor, b: Tensor) -> Tensor:
        """Dense k(a, b) on model-input rows (only the position columns matter)."""
        return self.covar_module(a[..., -2:], b[..., -2:]).to_dense()


class FeatureGP(SingleTaskGP):
    """Exact GP with an RBF kernel on feature columns plus a Matern kernel on position.

    Inputs are ``[features..., x, y]``. A fitted ``DeepKernelGP`` is frozen into one of
    these (features = its encoder's output), so acquisitions over 10^4 candidates do
    not re-run the network for every posterior.
    """

    def __init__(self, train_x: Tensor, train_y: Tensor, latent: int) -> None:
        kernel = ScaleKernel(RBFKernel(ard_num_dims=latent)) + ScaleKernel(
            MaternKernel(nu=2.5, ard_num_dims=2)
        )
        super().__init__(train_x, train_y, covar_module=kernel, outcome_transform=Standardize(m=1))
        self.latent = latent

    def features(self, x: Tensor) -> Tensor:
        return x[..., :-2]

    def forward(self, x: Tensor) -> MultivariateNormal:
        z = self.features(x)
        k_struct, k_pos = self.covar_module.kernels
        return MultivariateNormal(self.mean_module(z), k_struct(z) + k_pos(x[..., -2:]))

    def kernel(self, a: Tensor, b: Tensor) -> Tensor:
        """Dense k(a, b) on *encoded* rows ``[features..., x, y]`` (what `encode` returns)."""
        k_struct, k_pos = self.covar_module.kernels
        return (k_struct(a[..., :-2], b[..., :-2]) + k_pos(a[..., -2:], b[..., -2:])).to_dense()


class DeepKernelGP(FeatureGP):
    """Deep kernel learning: RBF kernel on PatchEncoder(patch) + a position kernel.

    The position kernel lets the model learn spatial smoothness the scan cannot show
    (e.g. a slowly varying coercive field); the network learns which structure matters.
    """

    def __init__(
        self,
        train_x: Tensor,
        train_y: Tensor,
        patch_dim: int,
        channels: int,
        latent: int = 3,
        hidden: int = 32,
    ) -> None:
        super().__init__(train_x, train_y, latent)
        self.patch_dim = patch_dim
        self.encoder = PatchEncoder(patch_dim, channels, latent, hidden).to(DTYPE)

    def features(self, x: Tensor) -> Tensor:
        return self.encoder(x[..., : self.patch_dim])

    @torch.no_grad()
    def encode(self, x: Tensor, chunk: int = 4096) -> Tensor:
        """[encoder(patch), x, y] rows: the inputs of the frozen model."""
        parts = [self.encoder(x[k : k + chunk, : self.patch_dim]) for k in range(0, len(x), chunk)]
        return torch.cat([torch.cat(parts), x[..., -2:]], -1)

    def freeze(self) -> FeatureGP:
        """The same GP on fixed encoder features (hyperparameters copied, no network)."""
        train_x = self.train_inputs[0]
        train_y = self.outcome_transform.untransform(self.train_targets.unsqueeze(-1))[0]
        frozen = FeatureGP(self.encode(train_x), train_y, self.latent)
        state = {
            k: v
            for k, v in self.state_dict().items()
            if not k.startswith(("encoder", "outcome_transform"))
        }
        frozen.load_state_dict(state, strict=False)
        frozen.eval()
        return frozen


def fit_adam(model: SingleTaskGP, steps: int, lr: float = 0.02) -> float:
    """Maximise the exact marginal likelihood with Adam for at most `steps`; return -MLL."""
    mll = ExactMarginalLogLikelihood(model.likelihood, model)
    model.train()
    result = fit_gpytorch_mll_torch(
        mll,
        step_limit=steps,
        stopping_criterion=ExpMAStoppingCriterion(maxiter=steps, rel_tol=1e-6),
        optimizer=lambda params: torch.optim.Adam(params, lr=lr),
    )
    model.eval()
    return float(result.fval) if result.fval is not None else float("nan")


def transfer_state(new: SingleTaskGP, old: SingleTaskGP | None) -> bool:
    """Warm start: copy every parameter except the training-data buffers; True if copied."""
    if old is None:
        return False
    state: dict[str, Any] = {
        k: v for k, v in old.state_dict().items() if not k.startswith("outcome_transform")
    }
    new.load_state_dict(state, strict=False)
    return True


@torch.no_grad()
def predict(model: SingleTaskGP, x: Tensor, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """Posterior mean and standard deviation (outcome units) of f at x, in chunks.

    Only the diagonal of the test covariance is formed (one Cholesky of the training
    covariance, then per-chunk cross-covariances), so 10^4 candidates cost
    O(n^2 + N n) memory instead of the N x N joint covariance a full posterior builds.
    """
    model.eval()
    tx = model.train_inputs[0]
    n = tx.shape[0]
    prior = model.forward(tx)
    k_xx = prior.lazy_covariance_matrix.to_dense()
    noise = model.likelihood.noise.reshape(-1)[0]
    eye = torch.eye(n, dtype=k_xx.dtype)
    jitter = 1e-8
    while True:
        chol, info = torch.linalg.cholesky_ex(k_xx + (noise + jitter) * eye)
        if int(info) == 0 or jitter > 1e-2:
            break
        jitter *= 10
    resid = (model.train_targets - prior.mean).unsqueeze(-1)
    alpha = torch.cholesky_solve(resid, chol)
    means, variances = [], []
    for k in range(0, x.shape[0], chunk):
        xc = x[k : k + chunk]
        joint = model.forward(torch.cat([tx, xc]))
        cov = joint.lazy_covariance_matrix
        k_sx = cov[n:, :n].to_dense()
        k_ss = cov[n:, n:].diagonal(dim1=-2, dim2=-1)
        v = torch.linalg.solve_triangular(chol, k_sx.T, upper=False)
        means.append(joint.mean[n:] + (k_sx @ alpha).squeeze(-1))
        variances.append((k_ss - (v * v).sum(0)).clamp_min(0.0))
    mean, var = torch.cat(means), torch.cat(variances)
    tf = model.outcome_transform
    scale = tf.stdvs.reshape(-1)[0]
    return mean * scale + tf.means.reshape(-1)[0], var.sqrt() * scale
