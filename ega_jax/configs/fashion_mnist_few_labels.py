"""The demo's headline: label-efficient EGA on Fashion-MNIST with 3 labels per class.

configs/fashion_mnist.py with only 30 of the 60,000 training labels known
(3 per class, chosen by config.seed and written to the workdir's
labelled.json). Every image still reaches the student and the teacher: half of
each batch of 64 comes from the 30 labelled images (cross-entropy counts
those rows only), the other half from all 60,000 (EGA counts every row). The
cross-entropy-only baseline (distill.method=none) trains on the 30 labelled
images alone. Few labels and many images is where a self-supervised teacher,
which saw every image, has knowledge the student cannot get from the labels.

Why 3 per class: a logistic regression on the demo teacher's features beats
one on raw pixels only below about 5 labels per class (docs/ega_study.md,
"How many labels"); with more labels the pixels alone teach as much as this
teacher knows. 3 per class is also near the smallest standard semi-supervised
benchmark (40 CIFAR-10 labels, 4 per class).

  python -m ega_jax.main --config=configs/fashion_mnist_few_labels.py --workdir=/tmp/run \
      --config.teacher.checkpoint=demo_out/teacher/flax \
      --config.teacher.cache=demo_out/teacher/cache
"""

from ega_jax.configs import fashion_mnist


def get_config():
  config = fashion_mnist.get_config()
  config.dataset.num_labelled = 30
  config.dataset.labelled_share = 0.5
  return config
