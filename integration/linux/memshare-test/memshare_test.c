// SPDX-License-Identifier: GPL-2.0-only
/*
 * hvcproxyd memshare test module: shares and unshares guest pages on demand
 * through the kernel's own interface, set_memory_decrypted() and
 * set_memory_encrypted(), which on a pKVM guest turn into MEM_SHARE and
 * MEM_UNSHARE hypercalls (drivers/virt/coco/pkvm-guest/arm-pkvm-guest.c).
 *
 * Control file: /sys/kernel/debug/hvcproxyd-memshare/ctl
 *   echo "share N"  > ctl   allocate N physically contiguous pages, decrypt them
 *   echo "unshare"  > ctl   encrypt the newest region again and free it
 *   echo "reshare"  > ctl   decrypt the newest region a second time (the
 *                           hypervisor must refuse: the write fails with EPERM)
 *   cat ctl                 one line per region still shared:
 *                           "region <phys, hex> <pages>"
 * Every operation is also logged as "hvcproxyd-memshare: ...".
 */

#define pr_fmt(fmt) "hvcproxyd-memshare: " fmt

#include <linux/debugfs.h>
#include <linux/gfp.h>
#include <linux/list.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include <asm/mem_encrypt.h>

#define MAX_PAGES 256

struct region {
	struct list_head node;
	void *vaddr;
	unsigned int pages;
};

static LIST_HEAD(regions);
static DEFINE_MUTEX(lock);
static struct dentry *dir;

static int do_share(unsigned int pages)
{
	struct region *r;
	int ret;

	if (!pages || pages > MAX_PAGES)
		return -EINVAL;
	r = kzalloc(sizeof(*r), GFP_KERNEL);
	if (!r)
		return -ENOMEM;
	r->vaddr = alloc_pages_exact(pages * PAGE_SIZE, GFP_KERNEL | __GFP_ZERO);
	if (!r->vaddr) {
		kfree(r);
		return -ENOMEM;
	}
	r->pages = pages;
	ret = set_memory_decrypted((unsigned long)r->vaddr, pages);
	if (ret) {
		/* Partly shared: the pages must not go back to the allocator. */
		pr_err("share %u pages at 0x%llx failed: %d (pages leaked)\n",
		       pages, (unsigned long long)virt_to_phys(r->vaddr), ret);
		kfree(r);
		return ret;
	}
	list_add(&r->node, &regions);
	pr_info("shared %u pages at 0x%llx\n", pages,
		(unsigned long long)virt_to_phys(r->vaddr));
	return 0;
}

static int do_unshare(void)
{
	struct region *r = list_first_entry_or_null(&regions, struct region, node);
	unsigned long long phys;
	int ret;

	if (!r)
		return -ENOENT;
	phys = virt_to_phys(r->vaddr);
	ret = set_memory_encrypted((unsigned long)r->vaddr, r->pages);
	list_del(&r->node);
	if (ret) {
		pr_err("unshare %u pages at 0x%llx failed: %d (pages leaked)\n",
		       r->pages, phys, ret);
	} else {
		pr_info("unshared %u pages at 0x%llx\n", r->pages, phys);
		free_pages_exact(r->vaddr, r->pages * PAGE_SIZE);
	}
	kfree(r);
	return ret;
}

static int do_reshare(void)
{
	struct region *r = list_first_entry_or_null(&regions, struct region, node);
	int ret;

	if (!r)
		return -ENOENT;
	ret = set_memory_decrypted((unsigned long)r->vaddr, r->pages);
	pr_info("reshare %u pages at 0x%llx: %d\n", r->pages,
		(unsigned long long)virt_to_phys(r->vaddr), ret);
	return ret;
}

static ssize_t ctl_write(struct file *file, const char __user *ubuf,
			 size_t count, loff_t *ppos)
{
	char buf[32], *cmd;
	unsigned int pages;
	int ret;

	if (count >= sizeof(buf))
		return -EINVAL;
	if (copy_from_user(buf, ubuf, count))
		return -EFAULT;
	buf[count] = '\0';
	cmd = strim(buf);

	mutex_lock(&lock);
	if (sscanf(cmd, "share %u", &pages) == 1)
		ret = do_share(pages);
	else if (!strcmp(cmd, "unshare"))
		ret = do_unshare();
	else if (!strcmp(cmd, "reshare"))
		ret = do_reshare();
	else
		ret = -EINVAL;
	mutex_unlock(&lock);
	return ret ? ret : count;
}

static int ctl_show(struct seq_file *m, void *v)
{
	struct region *r;

	mutex_lock(&lock);
	list_for_each_entry_reverse(r, &regions, node)
		seq_printf(m, "region 0x%llx %u\n",
			   (unsigned long long)virt_to_phys(r->vaddr), r->pages);
	mutex_unlock(&lock);
	return 0;
}

static int ctl_open(struct inode *inode, struct file *file)
{
	return single_open(file, ctl_show, NULL);
}

static const struct file_operations ctl_fops = {
	.owner = THIS_MODULE,
	.open = ctl_open,
	.read = seq_read,
	.llseek = seq_lseek,
	.release = single_release,
	.write = ctl_write,
};

static int __init memshare_test_init(void)
{
	dir = debugfs_create_dir("hvcproxyd-memshare", NULL);
	debugfs_create_file("ctl", 0600, dir, NULL, &ctl_fops);
	pr_info("ready\n");
	return 0;
}

static void __exit memshare_test_exit(void)
{
	debugfs_remove_recursive(dir);
	mutex_lock(&lock);
	while (!list_empty(&regions))
		do_unshare();
	mutex_unlock(&lock);
}

module_init(memshare_test_init);
module_exit(memshare_test_exit);
MODULE_DESCRIPTION("hvcproxyd: share and unshare guest pages on demand");
MODULE_LICENSE("GPL");
