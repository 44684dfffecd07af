"""Write imagenet.csv and restricted_imagenet.csv in this folder (run once; the CSV files are what is shipped).

    python data/superclasses/generate.py SEAM_SCN2C_CSV

SEAM_SCN2C_CSV is qibinhang/SeaM's src/multi_class/datasets/imagenet_superclass_scn2c.csv: one line per superclass,
``name,wnid wnid ...``, in the order of SeaM's superclass indices (its imagenet_superclass_idx2sc.csv). The
Restricted ImageNet groups are the inclusive ImageNet index ranges of MadryLab/robustness
(robustness/tools/constants.py RESTRICTED_IMAGNET_RANGES, names from robustness/tools/label_maps.py).

Sources for the ImageNet-1k classes, cross-checked against each other before anything is written:
- timm's ``ImageNetInfo`` (timm/data/_info/imagenet_synsets.txt: the 1000 wnids in class-index order, and
  imagenet_synset_to_lemma.txt: the WordNet lemmas written to the ``name`` column);
- torchvision's ``_IMAGENET_CATEGORIES`` (the class names in index order shipped with torchvision's weights): its
  name for index i must be one of timm's lemmas of wnid i (two known renames, listed below, are the exception).
"""
import csv
import os
import sys

from timm.data import ImageNetInfo
from torchvision.models._meta import _IMAGENET_CATEGORIES

HERE = os.path.dirname(os.path.abspath(__file__))
# torchvision renamed two duplicated names; every other index carries one of the WordNet lemmas verbatim
TORCHVISION_RENAMES = {134: 'crane bird', 639: 'maillot tank suit'}
RESTRICTED = [('dog', 151, 268), ('cat', 281, 285), ('frog', 30, 32), ('turtle', 33, 37), ('bird', 80, 100),
              ('primate', 365, 382), ('fish', 389, 397), ('crab', 118, 121), ('insect', 300, 319)]
# SeaM's superclass order (imagenet_superclass_idx2sc.csv): index k of the list is SeaM's --target_superclass_idx k
SEAM_ORDER = ['fish', 'shark', 'bird', 'salamander', 'frog', 'turtle', 'lizard', 'crocodile', 'dinosaur', 'snake',
              'trilobite', 'arachnid', 'bug', 'ungulate', 'monotreme', 'marsupial', 'coral', 'mollusk', 'crustacean',
              'marine mammals', 'dog', 'wild dog', 'cat', 'wild cat', 'bear', 'sloth', 'mongoose', 'butterfly',
              'echinoderms', 'rabbit', 'rodent', 'plant', 'hog', 'ferret', 'armadillo', 'primate', 'technology',
              'clothing', 'instrument', 'boat', 'aircraft', 'furniture', 'vehicle', 'decor', 'outdoor scene',
              'weapon', 'accessory', 'building', 'sports equipment', 'toy', 'tool', 'other', 'container', 'ball',
              'hat', 'lab equipment', 'food', 'paper', 'train', 'cooking', 'electronics', 'fence', 'fruit', 'person',
              'vegetable', 'flower', 'fungus']


def imagenet_classes():
    """(wnids in index order, wnid -> lemma string), after checking timm against torchvision."""
    info = ImageNetInfo()
    wnids = [info.index_to_label_name(i) for i in range(1000)]
    assert len(set(wnids)) == 1000 and wnids == sorted(wnids), 'ImageNet index order is the sorted wnid order'
    lemmas = {w: info.label_name_to_description(w) for w in wnids}
    assert len(_IMAGENET_CATEGORIES) == 1000
    for i, w in enumerate(wnids):
        names = [n.strip() for n in lemmas[w].split(',')]
        if i in TORCHVISION_RENAMES:
            assert _IMAGENET_CATEGORIES[i] == TORCHVISION_RENAMES[i], (i, _IMAGENET_CATEGORIES[i])
        else:
            assert _IMAGENET_CATEGORIES[i] in names, (i, w, _IMAGENET_CATEGORIES[i], names)
    return wnids, lemmas


def read_seam(path):
    groups = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                name, members = line.rstrip('\n').split(',')
                assert name not in groups, name
                groups[name] = members.split(' ')
    assert list(groups) == SEAM_ORDER, 'superclass order differs from SeaM imagenet_superclass_idx2sc.csv'
    return groups


def write(path, comment, groups, wnids, lemmas):
    index = {w: i for i, w in enumerate(wnids)}
    with open(path, 'w', newline='') as f:
        f.write(comment)
        out = csv.writer(f, lineterminator='\n')
        out.writerow(['superclass', 'wnid', 'index', 'name'])
        for name, members in groups.items():
            for w in sorted(members, key=index.__getitem__):
                out.writerow([name, w, index[w], lemmas[w]])


def main(seam_path):
    wnids, lemmas = imagenet_classes()
    seam = read_seam(seam_path)
    members = [w for ws in seam.values() for w in ws]
    assert sorted(members) == wnids, "SeaM's 67 superclasses partition the 1000 ImageNet classes"
    write(os.path.join(HERE, 'imagenet.csv'),
          "# SeaM's 67 ImageNet-1k superclasses, in SeaM's superclass-index order (qibinhang/SeaM\n"
          '# src/multi_class/datasets/imagenet_superclass_scn2c.csv, after noameshed/novelty-detection).\n'
          '# index = ImageNet-1k class index (sorted wnids), name = WordNet lemmas (timm ImageNetInfo).\n'
          '# Written by generate.py; see README.md.\n',
          seam, wnids, lemmas)
    restricted = {name: wnids[lo:hi + 1] for name, lo, hi in RESTRICTED}
    write(os.path.join(HERE, 'restricted_imagenet.csv'),
          '# Restricted ImageNet: MadryLab/robustness RESTRICTED_IMAGNET_RANGES (inclusive ImageNet index ranges),\n'
          '# in the label order of its label map. index = ImageNet-1k class index, name = WordNet lemmas (timm).\n'
          '# Written by generate.py; see README.md.\n',
          restricted, wnids, lemmas)


if __name__ == '__main__':
    if len(sys.argv) != 2:
        sys.exit(__doc__.split('\n\n')[1])
    main(sys.argv[1])
