"""Print a user's history from the online store (what the server reads for a user_id-only request).

    python feature_repo/scripts/show_history.py REPO USER_ID [--env local|cluster]

REPO is a built feature repo (the pipeline's build_features output, or
`unipinrec.features.build_feature_store`). Kept out of `feast apply` by .feastignore.
"""
import argparse
import json

from unipinrec.features import OnlineHistoryLookup

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo")
    parser.add_argument("user_id", type=int)
    parser.add_argument("--env", default="local", choices=["local", "cluster"])
    args = parser.parse_args()
    for action in OnlineHistoryLookup(args.repo, args.env).lookup(args.user_id):
        print(json.dumps(action))
