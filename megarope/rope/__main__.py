"""``python -m megarope.rope``: the method table for a default 4k -> 32k extension (head dim 128)."""

from megarope.rope.config import RopeConfig, method_table

WINDOW, SCALE, HEAD_DIM = 4096, 8, 128


def default_methods() -> dict[str, RopeConfig]:
    common = {"head_dim": HEAD_DIM, "max_position_embeddings": WINDOW * SCALE}
    n = HEAD_DIM // 2
    return {
        # the un-extended model: its window is the original 4k (dynamic below grows from the same 4k)
        "default": RopeConfig(**{**common, "max_position_embeddings": WINDOW}),
        "linear (PI)": RopeConfig(rope_type="linear", factor=SCALE, **common),
        "ntk": RopeConfig(rope_type="ntk", factor=SCALE, **common),
        "dynamic": RopeConfig(rope_type="dynamic", factor=SCALE, **{**common, "max_position_embeddings": WINDOW}),
        "yarn": RopeConfig(rope_type="yarn", factor=SCALE, original_max_position_embeddings=WINDOW, **common),
        "llama3": RopeConfig(
            rope_type="llama3", factor=SCALE, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=WINDOW, **common,
        ),
        "abf": RopeConfig(rope_type="abf", rope_theta=500_000.0, **common),
        "eabf": RopeConfig(rope_type="eabf", rope_theta=500_000.0, original_max_position_embeddings=WINDOW, **common),
        "longrope (PI-seeded)": RopeConfig(
            rope_type="longrope", long_factor=[float(SCALE)] * n, short_factor=[1.0] * n,
            original_max_position_embeddings=WINDOW, n_hat=16, **common,
        ),
    }


if __name__ == "__main__":
    print(method_table(default_methods(), [WINDOW, WINDOW * SCALE]))
