"""Writers of tiny KuaiSAR and JDsearch files in exactly their published layouts (column
order as published, header lines included), for the reader tests.

Rows are given as lists of field strings so a test can also write malformed ones.
"""
import csv
import os

KUAISAR_COLUMNS = {
    "rec_inter.csv": ["user_id", "item_id", "playing_time", "duration_ms", "time", "timestamp",
                      "click", "forward", "like", "follow", "search", "search_item_related"],
    "src_inter.csv": ["user_id", "search_session_id", "search_session_time",
                      "search_session_timestamp", "keyword", "search_source", "item_id",
                      "click_cnt", "item_type"],
    "item_features.csv": ["item_id", "caption", "author_id", "item_type", "upload_time",
                          "upload_type", "first_level_category_id", "first_level_category_name",
                          "second_level_category_id", "second_level_category_name",
                          "third_level_category_id", "third_level_category_name",
                          "fourth_level_category_id", "fourth_level_category_name"],
    "user_features.csv": ["user_id", "search_active_level", "rec_active_level", "onehot_feat1",
                          "onehot_feat2"],
}

JD_BEHAVIOUR_COLUMNS = ["query", "candidate_wid_list", "candidate_label_list", "history_qry_list",
                        "history_wid_list", "history_type_list", "history_time_list"]
JD_PRODUCT_COLUMNS = ["wid", "name", "brand_id", "brand_name", "cate_id_1", "cate_name_1",
                      "cate_id_2", "cate_name_2", "cate_id_3", "cate_name_3", "cate_id_4",
                      "cate_name_4", "shop_id"]
TERM_SEPARATOR = "\x18"


def write_csv(path, columns, rows, raw_lines=()):
    """CSV with a header; `rows` are field lists (quoted as needed), `raw_lines` are appended
    verbatim (for malformed lines)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(row)
        for line in raw_lines:
            f.write(line + "\n")
    return path


def rec_row(user, item, playing_ms, duration_ms, timestamp_ms, like=0, follow=0, forward=0,
            click=1):
    """One feed impression; click=0 is an item shown but not opened (not a behaviour)."""
    return [user, item, playing_ms, duration_ms, "2022-05-22 10:00:00", timestamp_ms, click,
            forward, like, follow, 0, 0]


def src_row(user, session, timestamp_ms, keyword, item, click_cnt, item_type="VIDEO"):
    return [user, session, "2022-05-22 10:00:00", timestamp_ms, keyword, 1, item, click_cnt,
            item_type]


def item_row(item, caption, author, cat1, cat2):
    return [item, caption, author, "NORMAL", "2022-01-01", "UPLOAD", cat1, "c1", cat2, "c2",
            "", "", "", ""]


def write_kuaisar(directory, rec_rows=(), src_rows=(), item_rows=(), user_rows=(),
                  raw=None, with_users=True):
    """Writes the four KuaiSAR CSV files; `raw` maps a file name to extra verbatim lines."""
    os.makedirs(directory, exist_ok=True)
    raw = raw or {}
    rows = {"rec_inter.csv": rec_rows, "src_inter.csv": src_rows,
            "item_features.csv": item_rows, "user_features.csv": user_rows}
    for name, columns in KUAISAR_COLUMNS.items():
        if name == "user_features.csv" and not with_users:
            continue
        write_csv(os.path.join(directory, name), columns, rows[name], raw.get(name, ()))
    return directory


def jd_terms(terms):
    return TERM_SEPARATOR.join(str(t) for t in terms)


def jd_line(query_terms, candidates, labels, history=(), gaps=None):
    """One user line. history: (query terms or None for -1, wid, type) tuples; gaps: the
    history_time_list (len(history) + 1 entries; default all 10 with a first 0)."""
    if gaps is None:
        gaps = [0] + [10] * len(history)
    fields = [jd_terms(query_terms), "_".join(candidates),
              "_".join(f"{float(x):.1f}" for x in labels),
              "_".join("-1" if q is None else jd_terms(q) for q, _, _ in history),
              "_".join(w for _, w, _ in history),
              "_".join(t for _, _, t in history),
              "_".join(str(g) for g in gaps)]
    return "\t".join(fields)


def jd_product(wid, name_terms, brand, cat1, cat2, shop="s1"):
    return "\t".join([wid, jd_terms(name_terms), brand, jd_terms([7]), cat1, jd_terms([8]), cat2,
                      jd_terms([9]), "c3", jd_terms([10]), "c4", jd_terms([11]), shop])


def write_jdsearch(directory, lines, products, header=True):
    """user_behavior_data.txt and product_meta_data.txt, tab-separated with their headers."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "user_behavior_data.txt"), "w", newline="") as f:
        if header:
            f.write("\t".join(JD_BEHAVIOUR_COLUMNS) + "\n")
        f.write("".join(line + "\n" for line in lines))
    with open(os.path.join(directory, "product_meta_data.txt"), "w", newline="") as f:
        if header:
            f.write("\t".join(JD_PRODUCT_COLUMNS) + "\n")
        f.write("".join(line + "\n" for line in products))
    return directory
