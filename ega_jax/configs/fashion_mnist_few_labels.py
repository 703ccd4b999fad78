"""The demo's headline: label-efficient EGA on Fashion-MNIST with 10 labels per class.

configs/fashion_mnist.py with only 100 of the 60,000 training labels known
(10 per class, chosen by config.seed and written to the workdir's
labelled.json). Every image still reaches the student and the teacher: half of
each batch of 64 comes from the 100 labelled images (cross-entropy counts
those rows only), the other half from all 60,000 (EGA counts every row). The
cross-entropy-only baseline (distill.method=none) trains on the 100 labelled
images alone. Few labels and many images is where a self-supervised teacher,
which saw every image, has knowledge the student cannot get from the labels.

  python -m ega_jax.main --config=configs/fashion_mnist_few_labels.py --workdir=/tmp/run \
      --config.teacher.checkpoint=demo_out/teacher/flax \
      --config.teacher.cache=demo_out/teacher/cache
"""

from ega_jax.configs import fashion_mnist


def get_config():
  config = fashion_mnist.get_config()
  config.dataset.num_labelled = 100
  config.dataset.labelled_share = 0.5
  return config
