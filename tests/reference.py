"""NumPy implementations of the papers' equations, used as test oracles.

Written from the update rules in the LAMB (arXiv:1904.00962, Alg. 2) and LARS
(arXiv:1708.03888, Alg. 1, MLPerf form) papers, independently of keras_lamb's
code. float64 throughout.
"""

import numpy as np


def _ratio(numerator, denominator, w_norm, other_norm):
    if w_norm > 0 and other_norm > 0:
        return numerator / denominator
    return 1.0


class NumpyLAMB:
    def __init__(self, lr, beta_1=0.9, beta_2=0.999, epsilon=1e-6,
                 weight_decay=0.0, decay_mask=None, adapt_mask=None,
                 bias_correction=True, bounds=None, clip=False):
        self.__dict__.update(locals())
        self.t = 0
        self.m = self.v = None

    def step(self, weights, grads):
        if self.m is None:
            self.m = [np.zeros_like(w) for w in weights]
            self.v = [np.zeros_like(w) for w in weights]
        self.t += 1
        out = []
        for i, (w, g) in enumerate(zip(weights, grads)):
            self.m[i] = self.beta_1 * self.m[i] + (1 - self.beta_1) * g
            self.v[i] = self.beta_2 * self.v[i] + (1 - self.beta_2) * g * g
            m_hat, v_hat = self.m[i], self.v[i]
            if self.bias_correction:
                m_hat = m_hat / (1 - self.beta_1 ** self.t)
                v_hat = v_hat / (1 - self.beta_2 ** self.t)
            u = m_hat / (np.sqrt(v_hat) + self.epsilon)
            if self.decay_mask is None or self.decay_mask[i]:
                u = u + self.weight_decay * w
            r = 1.0
            if self.adapt_mask is None or self.adapt_mask[i]:
                w_norm = np.linalg.norm(w)
                u_norm = np.linalg.norm(u)
                phi = w_norm
                if self.bounds is not None:
                    phi = np.clip(w_norm, self.bounds[0], self.bounds[1])
                r = _ratio(phi, u_norm, w_norm, u_norm)
                if self.clip:  # LAMBC
                    r = min(r, 1.0)
            out.append(w - self.lr * r * u)
        return out


class NumpyLARS:
    def __init__(self, lr, momentum=0.9, weight_decay=1e-4, eta=1e-3,
                 epsilon=0.0, nesterov=False, decay_mask=None,
                 adapt_mask=None, clip=False):
        self.__dict__.update(locals())
        self.v = None

    def step(self, weights, grads):
        if self.v is None:
            self.v = [np.zeros_like(w) for w in weights]
        out = []
        for i, (w, g) in enumerate(zip(weights, grads)):
            wd = self.weight_decay
            if self.decay_mask is not None and not self.decay_mask[i]:
                wd = 0.0
            local_lr = 1.0
            if self.adapt_mask is None or self.adapt_mask[i]:
                w_norm = np.linalg.norm(w)
                g_norm = np.linalg.norm(g)
                local_lr = _ratio(self.eta * w_norm,
                                  g_norm + wd * w_norm + self.epsilon,
                                  w_norm, g_norm)
                if self.clip and w_norm > 0 and g_norm > 0:
                    local_lr = min(local_lr / self.lr, 1.0)
            step = self.lr * local_lr * (g + wd * w)
            self.v[i] = self.momentum * self.v[i] + step
            if self.nesterov:
                out.append(w - (self.momentum * self.v[i] + step))
            else:
                out.append(w - self.v[i])
        return out
