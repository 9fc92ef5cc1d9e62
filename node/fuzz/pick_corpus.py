# usage (from node/fuzz): python3 pick_corpus.py CONTROL_FILE unused OUT_DIR MAX_FILES MAX_BYTES
# Keeps a small corpus: a greedy set cover of the files of a libFuzzer merge control file
# (-merge=1 -merge_control_file=...) by their features, at most MAX_FILES files and MAX_BYTES
# bytes, most new features first. See docs/security.md, "Fuzzing".
import sys, os, shutil
cf, src, out, maxn, maxb = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
lines = open(cf).read().split("\n")
n_files = int(lines[0]); files = lines[2:2 + n_files]
feats = {}
for l in lines[2 + n_files:]:
    p = l.split()
    if len(p) >= 2 and p[0] == "FT":
        feats[int(p[1])] = set(map(int, p[2:]))
covered = set(); chosen = []; total = 0
cand = {i: f for i, f in feats.items()}
while cand and len(chosen) < maxn:
    best = max(cand, key=lambda i: (len(cand[i] - covered), -os.path.getsize(files[i])))
    gain = len(cand[best] - covered)
    if gain == 0: break
    size = os.path.getsize(files[best])
    del cand[best]
    if total + size > maxb: continue
    covered |= feats[best]; chosen.append(best); total += size
allf = set().union(*feats.values()) if feats else set()
os.makedirs(out, exist_ok=True)
for i in chosen: shutil.copy(files[i], out)
print(f"files {len(feats)} -> {len(chosen)}, bytes {total}, features {len(covered)}/{len(allf)}")
