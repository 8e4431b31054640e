"""Reference numbers of the paper's graph experiments, kept as data (used by :mod:`dfa_lightning.graphs_reproduce`).

Launay et al. 2020, 'Direct Feedback Alignment Scales to Modern Deep Learning Tasks and Architectures', arXiv v1: Table 3 (test accuracy %, public Planetoid split; DNA: 5-fold split), Table A.4 (shallow), Table 4 (GAE link prediction), Table A.2 (alignment on Cora after 250 epochs, all nodes, deepest DFA point; std in parentheses in the paper). Transcribed from /work/shared/reference/paper.md.

Accuracies are in percent, link-prediction AUC / AP and alignment cosines in [0, 1].
"""
from __future__ import annotations

PAPER_GRAPHS: dict = {'node_classification': {'Cora': {'cheb': {'bp': 79.2, 'dfa': 75.4, 'shallow': 23.3},
                                  'gcn': {'bp': 80.1, 'dfa': 79.9, 'shallow': 37.0},
                                  'spline': {'bp': 81.0, 'dfa': 77.7, 'shallow': 39.6},
                                  'gat': {'bp': 82.6, 'dfa': 80.6, 'shallow': 59.4},
                                  'dna': {'bp': 84.6, 'dfa': 82.9, 'shallow': 30.2}},
                         'CiteSeer': {'cheb': {'bp': 69.5, 'dfa': 67.6, 'shallow': 27.4},
                                      'gcn': {'bp': 71.6, 'dfa': 69.4, 'shallow': 33.8},
                                      'spline': {'bp': 70.0, 'dfa': 69.8, 'shallow': 30.1},
                                      'gat': {'bp': 72.0, 'dfa': 71.2, 'shallow': 49.8},
                                      'dna': {'bp': 73.4, 'dfa': 70.8, 'shallow': 24.0}},
                         'PubMed': {'cheb': {'bp': 79.5, 'dfa': 75.7, 'shallow': 37.6},
                                    'gcn': {'bp': 78.8, 'dfa': 77.8, 'shallow': 44.8},
                                    'spline': {'bp': 77.5, 'dfa': 77.2, 'shallow': 44.2},
                                    'gat': {'bp': 77.7, 'dfa': 77.1, 'shallow': 67.8},
                                    'dna': {'bp': 87.2, 'dfa': 79.9, 'shallow': 42.2}}},
 'link_prediction': {'Cora': {'gae': {'bp': {'auroc': 0.918, 'ap': 0.918}, 'dfa': {'auroc': 0.9, 'ap': 0.9}}},
                     'CiteSeer': {'gae': {'bp': {'auroc': 0.886, 'ap': 0.895}, 'dfa': {'auroc': 0.879, 'ap': 0.889}}},
                     'PubMed': {'gae': {'bp': {'auroc': 0.967, 'ap': 0.966}, 'dfa': {'auroc': 0.945, 'ap': 0.945}}}},
 'alignment_cora': {'cheb': {'mean': 0.87, 'std': 0.12},
                    'gcn': {'mean': 0.77, 'std': 0.25},
                    'spline': {'mean': 0.56, 'std': 0.22},
                    'gat': {'mean': 0.63, 'std': 0.18},
                    'dna': {'mean': 0.92, 'std': 0.3}}}
