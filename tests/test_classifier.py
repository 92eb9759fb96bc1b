"""Classification data, the classifier job and the attack evaluation, on tiny generated data."""

import json
import os
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import RecordingWriter

from sr_purify import attacks, models, restore, training
from sr_purify import classification_data as cdata
from sr_purify.jobs import classifier as classifier_job

# Created in this order on purpose: labels must follow the sorted names (apple 0, mango 1, zebra 2).
CLASSES = ('zebra', 'apple', 'mango')
COLOURS = {'apple': (200, 40, 40), 'mango': (40, 200, 40), 'zebra': (40, 40, 200)}


def _indexed_split(n=40, size=8):
    """Images whose first pixel is their index, so a batch shows which examples it holds."""
    images = np.zeros((n, size, size, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    images[:, 1:, :, :] = np.random.default_rng(0).integers(0, 256, (n, size - 1, size, 3))
    return cdata.Split(images, (np.arange(n) % 3).astype(np.int32), ('a', 'b', 'c'), 'arrays')


def _train(split, n=3, start=0, seed=0, process_index=0, process_count=1, **kw):
    it = cdata.train_batches(
        split,
        global_batch=8,
        seed=seed,
        start_step=start,
        process_index=process_index,
        process_count=process_count,
        **kw,
    )
    return [next(it) for _ in range(n)]


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """<root>/{train,test}/<class>/*.jpg: one colour per class plus noise, 32x32 JPEGs."""
    from PIL import Image

    root = tmp_path_factory.mktemp('folder')
    rng = np.random.default_rng(0)
    for split, count in (('train', 24), ('test', 8)):
        for c in CLASSES:
            os.makedirs(root / split / c)
            for i in range(count):
                pixels = np.asarray(COLOURS[c], np.float32) + rng.normal(0, 30, (32, 32, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    root / split / c / f'{i:03d}.jpg', quality=95
                )
    return root


def _data_config(path, cache_dir):
    from configs import classifier

    data = classifier.data_config(eval_examples=0)
    data.path, data.cache_dir, data.source = str(path), str(cache_dir), 'folder'
    return data


# ---------------------------------------------------------------------------------------------
# The input pipeline.


def test_train_batches_shapes_range_and_epochs():
    split = _indexed_split()
    b = _train(split, n=1)[0]
    assert b['image'].shape == (8, 8, 8, 3) and b['image'].dtype == np.float32
    assert b['label'].shape == (8,) and b['label'].dtype == np.int32
    assert 0.0 <= b['image'].min() and b['image'].max() <= 1.0
    # Without augmentation the first pixel names the example: an epoch visits each one once.
    epoch = _train(split, n=5, pad=0, flip=False)
    seen = np.concatenate([np.round(x['image'][:, 0, 0, 0] * 255) for x in epoch]).astype(int)
    assert sorted(seen) == list(range(40))
    np.testing.assert_array_equal(np.concatenate([x['label'] for x in epoch]), seen % 3)
    # The next epoch is another permutation.
    after = _train(split, n=5, start=5, pad=0, flip=False)
    again = np.concatenate([np.round(x['image'][:, 0, 0, 0] * 255) for x in after]).astype(int)
    assert sorted(again) == list(range(40)) and not np.array_equal(again, seen)


def test_train_batches_are_deterministic_resumable_and_split_across_processes():
    split = _indexed_split()
    a, b = _train(split, n=7), _train(split, n=7)  # 7 steps of 8 cross an epoch boundary.
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x['image'], y['image'])
    assert not np.array_equal(a[0]['image'], _train(split, n=1, seed=1)[0]['image'])
    # Augmentation happens: the random crops shift some images off their raw pixels.
    assert not np.array_equal(a[0]['image'], _train(split, n=1, pad=0, flip=False)[0]['image'])
    # Starting at step 5 gives exactly the sixth batch onwards of an uninterrupted run.
    for x, y in zip(_train(split, n=2, start=5), a[5:]):
        np.testing.assert_array_equal(x['image'], y['image'])
    # Two processes each make half of every global batch; together they make the same batch.
    halves = [_train(split, n=7, process_index=p, process_count=2) for p in (0, 1)]
    for step in range(7):
        for k in ('image', 'label'):
            joined = np.concatenate([halves[0][step][k], halves[1][step][k]])
            np.testing.assert_array_equal(joined, a[step][k])


def test_eval_batches_pad_and_mask_every_example_once():
    split = _indexed_split(n=37)
    batches = list(cdata.eval_batches(split, global_batch=8))
    assert len(batches) == 5 and all(b['image'].shape == (8, 8, 8, 3) for b in batches)
    mask = np.concatenate([b['mask'] for b in batches])
    assert mask.sum() == 37 and mask[:37].all()
    ids = np.concatenate([np.round(b['image'][:, 0, 0, 0] * 255) for b in batches])[mask > 0]
    np.testing.assert_array_equal(ids, np.arange(37))
    np.testing.assert_array_equal(
        np.concatenate([b['label'] for b in batches])[mask > 0], split.labels
    )
    # Two processes: their slices of each global batch concatenate to the one-process batch.
    parts = [
        list(cdata.eval_batches(split, global_batch=8, process_index=p, process_count=2))
        for p in (0, 1)
    ]
    for i, b in enumerate(batches):
        for k in b:
            np.testing.assert_array_equal(np.concatenate([parts[0][i][k], parts[1][i][k]]), b[k])


def test_subset_is_a_fixed_seeded_selection():
    split = _indexed_split(n=40)
    a, b = cdata.subset(split, 10, 0), cdata.subset(split, 10, 0)
    np.testing.assert_array_equal(a.images, b.images)
    assert len(a) == 10 and len(set(a.images[:, 0, 0, 0])) == 10
    assert not np.array_equal(a.images, cdata.subset(split, 10, 1).images)
    assert len(cdata.subset(split, 0, 0)) == 40
    with pytest.raises(ValueError, match='asked for 41 examples'):
        cdata.subset(split, 41, 0)


def test_folder_and_tar_give_the_same_split_with_sorted_class_labels(image_folder, tmp_path):
    data = _data_config(image_folder, tmp_path / 'cache')
    train = cdata.load_split(data, 'train')
    assert train.class_names == ('apple', 'mango', 'zebra')
    assert train.images.shape == (72, 32, 32, 3) and train.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(train.labels), [24, 24, 24])
    # Label k holds the images of colour k: red apples, green mangos, blue zebras.
    means = [train.images[train.labels == k].reshape(-1, 3).mean(0) for k in range(3)]
    assert [int(np.argmax(m)) for m in means] == [0, 1, 2]
    # The decoded split is cached: the second load reads the .npz.
    assert len(os.listdir(tmp_path / 'cache')) == 1
    again = cdata.load_split(data, 'train')
    np.testing.assert_array_equal(again.images, train.images)

    # The same folder as <split>.tar files, read without extraction.
    tars = tmp_path / 'tars'
    os.makedirs(tars)
    for split in ('train', 'test'):
        with tarfile.open(tars / f'{split}.tar', 'w') as t:
            t.add(image_folder / split, arcname=split)
    for path in (tars, tars / 'test.tar'):  # The folder of tars, or one tar (sibling found).
        from_tar = cdata.load_split(_data_config(path, tmp_path / 'cache2'), 'train')
        assert from_tar.class_names == train.class_names
        np.testing.assert_array_equal(from_tar.images, train.images)
        np.testing.assert_array_equal(from_tar.labels, train.labels)


def test_missing_data_fails_at_once_naming_the_flag(tmp_path):
    data = _data_config(tmp_path / 'nope', tmp_path / 'cache')
    with pytest.raises(FileNotFoundError, match=r'not found.*--config.data.path='):
        cdata.load_split(data, 'train')
    data.source, data.data_dir = 'auto', str(tmp_path / 'tfds')  # No folder and no tfds either.
    with pytest.raises(
        FileNotFoundError,
        match=r"tfds 'cifar10' is not prepared.*"
        r'--config.data.path=',
    ):
        cdata.load_split(data, 'train')
    data.source = 'tfds'
    with pytest.raises(FileNotFoundError, match='not prepared.*--config.data.download=True'):
        cdata.load_split(data, 'train')
    os.makedirs(tmp_path / 'empty')
    data.source, data.path = 'folder', str(tmp_path / 'empty')
    with pytest.raises(FileNotFoundError, match='neither a train/ folder nor train.tar'):
        cdata.load_split(data, 'train')


# ---------------------------------------------------------------------------------------------
# The classifier job.


def _classifier_config(folder, cache, model='resnet', steps=2):
    from configs import classifier

    c = classifier.get_config('small_cnn' if model == 'small_cnn' else None)
    if model == 'resnet':
        c.model.depth = 8
    else:
        c.model.features = 8
    c.model.num_classes = 3
    c.data = _data_config(folder, cache)
    c.batch_size = 16
    c.eval_batch_size = 8
    c.total_steps = steps
    c.log_every = 1
    c.eval_every = 0
    c.checkpoint_every = steps
    c.optim.warmup_steps = 0
    return c


def test_two_step_resnet_run_writes_results_and_updates_batch_stats(image_folder, tmp_path):
    assert jax.device_count() == 8
    cfg = _classifier_config(image_folder, tmp_path / 'cache')
    writer = RecordingWriter()
    result = classifier_job.train_and_evaluate(cfg, str(tmp_path / 'wd'), writer=writer)
    assert result.step == 2 and sorted(writer.losses()) == [1, 2]
    results = json.load(open(tmp_path / 'wd' / 'results.json'))['classifier']
    assert results['eval_examples'] == 24
    assert results['params'] == models.parameter_count(result.state.params)
    assert (tmp_path / 'wd' / 'checkpoints' / '2').is_dir()
    # The checkpoint restores as model variables, with BatchNorm statistics that moved off init.
    restored = restore.load(str(tmp_path / 'wd'), 'classifier', model_config=cfg.model)
    variables, step = restored.variables, restored.step
    assert step == 2 and set(variables) == {'params', 'batch_stats'}
    stem = variables['batch_stats']['stem_bn']
    assert not np.allclose(stem['mean'], 0.0) and not np.allclose(stem['var'], 1.0)
    # The reported accuracy is the restored classifier's, in inference mode, on the 24 test images.
    test = cdata.load_split(cfg.data, 'test')
    images = jnp.asarray(test.images / 255.0, jnp.float32)
    logits = models.build(cfg.model).apply(variables, images, train=False)
    by_hand = float(np.mean(np.argmax(logits, -1) == test.labels))
    assert abs(results['accuracy'] - by_hand) <= 1e-6
    # The parameters live on all 8 devices: the batch really was split.
    assert len(jax.tree.leaves(result.state.params)[0].sharding.device_set) == 8


@pytest.fixture(scope='module')
def trained_cnn(image_folder, tmp_path_factory):
    """A small CNN trained a few dozen steps on the three colour classes."""
    root = tmp_path_factory.mktemp('cnn')
    cfg = _classifier_config(image_folder, root / 'cache', model='small_cnn', steps=40)
    cfg.log_every = 20
    cfg.optim.lr = 0.05
    classifier_job.train_and_evaluate(cfg, str(root / 'wd'), writer=RecordingWriter())
    return cfg, root


def _attack_config(cfg, root):
    from configs import evaluate

    c = evaluate.get_config('attack,small_cnn')
    c.classifier.model = cfg.model
    c.classifier.checkpoint = str(root / 'wd')
    c.data = cfg.data
    c.eval_examples = 0
    c.batch_size = 16
    # Large budgets: the colour classes are far apart, and the attacks must break some samples.
    eps = 96 / 255
    c.attacks = [
        attacks.attack_config(name='fgsm', eps=eps),
        attacks.attack_config(name='pgd', eps=eps, steps=3, step_size=eps / 2),
        attacks.attack_config(name='pgd', eps=0.0, steps=2),
        attacks.attack_config(name='mifgsm', eps=eps, steps=2),
        attacks.attack_config(name='apgd', eps=eps, steps=4),
    ]
    c.grid_samples = 2
    return c


def test_attack_evaluation_reports_consistent_accuracies(trained_cnn, tmp_path):
    cfg, root = trained_cnn
    config = _attack_config(cfg, root)
    from sr_purify.jobs import evaluate as evaluate_job

    result = evaluate_job.train_and_evaluate(config, str(tmp_path))

    # Clean accuracy by hand on the same 24 test images.
    from sr_purify import models

    variables = restore.load(str(root / 'wd'), 'classifier', model_config=cfg.model).variables
    test = cdata.load_split(cfg.data, 'test')
    logits = models.build(cfg.model).apply(variables, jnp.asarray(test.images / 255.0, jnp.float32))
    by_hand = float(np.mean(np.argmax(logits, -1) == test.labels))
    assert result['examples'] == 24
    assert result['clean']['accuracy'] == pytest.approx(by_hand)
    assert by_hand > 0.5  # The easy colour task was learnt, so attacks have something to break.

    per = result['per_attack']
    assert list(per) == [
        'fgsm linf 96/255',
        'pgd linf 96/255 x3',
        'pgd linf 0/255 x2',
        'mifgsm linf 96/255 x2',
        'apgd linf 96/255 x4',
    ]
    assert per['pgd linf 0/255 x2']['accuracy'] == result['clean']['accuracy']
    assert per['pgd linf 0/255 x2']['mean_linf'] == 0.0
    # One threat model here (L-inf 96/255; the eps = 0 attack is none): its worst case is the
    # samples correct clean and under each of its four attacks, and no other group exists.
    (threat,) = result['worst_case']
    worst = result['worst_case'][threat]
    assert threat == 'linf 96/255'
    assert worst['attacks'] == [k for k in per if k != 'pgd linf 0/255 x2']
    for label, r in per.items():
        assert worst['accuracy'] <= r['accuracy'], label
        assert r['max_linf'] <= r['config']['eps'] + 1e-6, label
    assert worst['accuracy'] <= result['clean']['accuracy']
    assert worst['robust'] == round(worst['accuracy'] * result['examples'])
    assert per['pgd linf 96/255 x3']['accuracy'] < result['clean']['accuracy']

    saved = json.load(open(tmp_path / 'results.json'))['attacks']
    assert saved['clean']['accuracy'] == result['clean']['accuracy']
    table = open(tmp_path / 'attacks_table.md').read()
    assert f'| clean | {result["clean"]["accuracy"]:.3f} |' in table
    assert f'| worst case linf 96/255 | {worst["accuracy"]:.3f} |' in table
    assert '0.5 + 10 x delta' in table
    assert (tmp_path / 'attacks_grid.png').exists()


def test_attack_evaluation_without_a_checkpoint_fails_at_once_naming_the_flag(tmp_path):
    from configs import evaluate
    from sr_purify.jobs import evaluate as evaluate_job

    config = evaluate.get_config('attack')
    config.classifier.checkpoint = str(tmp_path / 'nothing')
    with pytest.raises(
        FileNotFoundError, match=r'no classifier checkpoint .*--config.classifier.checkpoint='
    ):
        evaluate_job.train_and_evaluate(config, str(tmp_path / 'wd'))


def test_configs_build_and_reject_unknown_variants(image_folder, tmp_path):
    from configs import classifier, evaluate

    assert classifier.get_config().model.depth == 20
    # `:full` trains and scores on every image, with a schedule that ends at total_steps.
    full = classifier.get_config('full')
    full.data.path, full.data.cache_dir, full.data.source = (
        str(image_folder),
        str(tmp_path / 'cache'),
        'folder',
    )
    full.model.num_classes = 3
    train, test = classifier_job.load_data(full)
    assert (len(train), len(test)) == (72, 24)
    lr = training.make_schedule(full.optim, full.total_steps)
    warmup, total = full.optim.warmup_steps, full.total_steps
    assert float(lr(warmup)) == pytest.approx(full.optim.lr)
    assert float(lr(total - 100)) > 0.0 and float(lr(total)) == 0.0
    small = classifier.get_config('small_cnn')
    assert small.model.name == 'small_cnn' and small.seed != classifier.get_config().seed
    with pytest.raises(ValueError, match="unknown config variant 'huge'; valid: cpu, full"):
        classifier.get_config('huge')
    att = evaluate.get_config('attack')
    assert [a.name for a in att.attacks] == ['fgsm', 'pgd', 'pgd', 'mifgsm', 'apgd']
    att.eval_examples = 123  # One field, read by the data subset too.
    assert att.data.eval_examples == 123
    for a in att.attacks:
        attacks.validate(a)


def test_label_smoothing_is_cross_entropy_against_smoothed_targets():
    from configs import classifier

    model = models.build(models.flatten_config(classifier.small_cnn(num_classes=3)))
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
    labels = jnp.array([0, 1, 2, 1])
    params = model.init(jax.random.key(1), x, train=False)['params']
    logits = model.apply({'params': params}, x, train=True)
    log_p = jax.nn.log_softmax(logits)
    hard = -log_p[jnp.arange(4), labels]
    s = 0.1  # (1 - s) on the label, s / 3 on every class.
    expected = jnp.mean((1 - s) * hard - s / 3 * log_p.sum(-1))
    batch = {'image': x, 'label': labels}
    loss, (_, metrics) = classifier_job.make_loss_fn(model, s)(params, {}, batch, None)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    plain, _ = classifier_job.make_loss_fn(model)(params, {}, batch, None)
    np.testing.assert_allclose(plain, jnp.mean(hard), rtol=1e-6)
    assert float(metrics['accuracy']) == float(jnp.mean(jnp.argmax(logits, -1) == labels))
    with pytest.raises(ValueError, match=r'label_smoothing must be in \[0, 1\); got 1.0'):
        classifier_job.make_loss_fn(model, 1.0)
    victim = classifier.get_config('victim')
    assert victim.label_smoothing == 0.1 and victim.data.train_examples == 0
    assert victim.data.eval_examples == 0 and victim.total_steps == 14_000
